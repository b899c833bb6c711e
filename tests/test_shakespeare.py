import json
import re

import grain
import numpy as np
import pytest

from lmjax.data import shakespeare


@pytest.fixture(scope="module")
def text():
    return shakespeare.load_text()


def test_corpus_has_38_plays_in_sorted_order():
    paths = shakespeare.play_paths()
    assert len(paths) == 38
    root = paths[0].parents[1]
    keys = [p.relative_to(root).as_posix() for p in paths]
    assert keys == sorted(keys)


def test_text_is_speeches_with_speaker_lines(text):
    assert len(text) > 4_000_000  # ~4.8M characters; far less means whole plays were lost
    blocks = text.split("\n\n")
    assert blocks[-1] == ""  # the text ends with a speech's closing blank line
    speeches = blocks[:-1]
    assert len(speeches) > 30_000
    for block in speeches:
        lines = block.split("\n")
        assert lines[0].endswith(":") and len(lines) >= 2, block[:200]
    assert "\n\nHAMLET:\nTo be, or not to be: that is the question:\n" in text


def test_text_has_no_markdown_artefacts(text):
    for artefact in ("#", "*", "_", "\\", "[", "]", "  \n"):
        assert artefact not in text, f"found {artefact!r}"
    # No stage directions left as lines of their own ("Enter" alone is also a spoken verb).
    assert not re.search(r"(?m)^(Exit|Exeunt|Re-enter)\b", text)


def test_load_text_is_deterministic(text):
    assert shakespeare.load_text() == text


def test_markdown_to_text_on_the_tricky_cases():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room. LEAR on a bed\nasleep.\n\n"
        "_Enter KING and a Servant, with\nothers_\n\n"
        "**KING**  \nFirst line,  \nsecond line.\n\n"
        "_Exit Servant_\n\n"
        "Still the king:\\--talking.\n\n"
        "**LUCIO**  \n_\\[Aside to ISABELLA]_  \nAy, touch him.\n\n"
        "**SLENDER**  \n[Aside]_  \nO sweet Anne.\n\n"
        "**COUNTESS**  \n*[To the King.]*\nAlas.\n\n"
        "*Exit Audley, and\nreturns.*\n\n"
        "### Prologue\n\nNo speaker here.\n"
    )
    assert shakespeare.markdown_to_text(markdown) == (
        "KING:\nFirst line,\nsecond line.\nStill the king:--talking.\n\n"
        "LUCIO:\nAy, touch him.\n\n"
        "SLENDER:\nO sweet Anne.\n\n"
        "COUNTESS:\nAlas.\n\n"
        "PROLOGUE:\nNo speaker here.\n\n"
    )


def test_split_is_contiguous_disjoint_and_starts_a_speech(text):
    train, val = shakespeare.split_train_val(text, val_fraction=0.1)
    assert train + val == text
    assert 0.09 < len(val) / len(text) < 0.11
    assert train.endswith("\n\n")
    assert re.match(r"[^\n]+:\n", val)
    with pytest.raises(ValueError, match="val_fraction"):
        shakespeare.split_train_val(text, val_fraction=1.5)


def test_char_tokenizer_round_trip_and_json(text):
    tok = shakespeare.CharTokenizer.from_text(text)
    assert list(tok.chars) == sorted(set(text))
    assert 60 < tok.vocab_size < 100
    sample = text[:5000]
    ids = tok.encode(sample)
    assert max(ids) < tok.vocab_size and tok.decode(ids) == sample
    restored = shakespeare.CharTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert restored == tok and restored.encode(sample) == ids
    with pytest.raises(ValueError, match="not in this tokenizer"):
        tok.encode("~")


def test_make_tokenizer_by_name(text):
    assert shakespeare.make_tokenizer("chars", "ab") == shakespeare.CharTokenizer("ab")
    assert isinstance(shakespeare.make_tokenizer("char", "ab"), shakespeare.CharTokenizer)
    byte_tok = shakespeare.make_tokenizer("byte", "ignored")
    assert byte_tok.decode(byte_tok.encode("HAMLET:\nAy.")) == "HAMLET:\nAy."
    pieces = shakespeare.make_tokenizer("sentencepiece", text[:200_000], 512)
    assert pieces.vocab_size == 512 and pieces == shakespeare.make_tokenizer("sentencepiece", text[:200_000], 512)
    assert pieces.decode(pieces.encode(text[-3000:])) == text[-3000:]
    with pytest.raises(ValueError, match="choose one of: byte, chars, sentencepiece"):
        shakespeare.make_tokenizer("bpe", "ab")


def test_tokenizer_choice_is_checked_in_one_line():
    from lmjax.registry import ConfigError
    from lmjax.tasks.shakespeare import Section, check

    check(Section(), vocab_size=128, seq_len=64)
    check(Section(tokenizer="sentencepiece", vocab_size=1024), vocab_size=1024, seq_len=64)
    for section, vocab_size, message in [
        (Section(tokenizer="sentencepiece", vocab_size=1024), 512, "model.vocab_size=512 is smaller than data.vocab_size=1024"),
        (Section(tokenizer="sentencepiece"), 512, "needs data.vocab_size >= 300"),
        (Section(tokenizer="wordpiece"), 512, "choose one of: byte, chars, sentencepiece"),
        (Section(vocab_size=1024), 1024, "leave it 0 with data.tokenizer=chars"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check(section, vocab_size=vocab_size, seq_len=64)


@pytest.mark.slow  # 20 s; tests/test_tokenizers.py tests the tokenizer itself in the default run
def test_a_sentencepiece_run_trains_saves_its_tokenizer_and_generates(tmp_path, subprocess_env, capsys):
    """Through `python -m lmjax.main`: a few steps of a tiny model on sentencepiece ids, then
    `lmjax.generate`'s main (in this process) reads the tokenizer back from the run folder."""
    import subprocess

    from lmjax.generate.__main__ import main as generate_main

    from conftest import ROOT, cli

    from lmjax.data.tokenizers import load_tokenizer
    from lmjax.data.tokenizers.sentencepiece import SentencePieceTokenizer

    workdir = tmp_path / "run"
    overrides = {
        "data.tokenizer": "sentencepiece", "data.vocab_size": 384, "model.vocab_size": 384, "model.dim": 32,
        "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 1, "model.mlp_hidden": 64, "train.steps": 3,
        "train.batch_size": 2, "train.seq_len": 32, "train.log_every": 1, "train.eval_every": 3, "eval.max_batches": 1,
        "eval.batch_size": 2, "checkpoint.every": 3, "logging.progress_bar": False, "optim.warmup_steps": 1,
    }
    args = [f"--config={ROOT / 'configs' / 'shakespeare.py'}", f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]
    trained = subprocess.run(cli(*args), capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    saved = load_tokenizer(workdir / "tokenizer.json")
    train_text, _ = shakespeare.split_train_val(shakespeare.load_text(), 0.05)
    assert saved == SentencePieceTokenizer.train(train_text, 384)  # trained on the training split, deterministic

    capsys.readouterr()
    assert generate_main(["--workdir", str(workdir), "--prompt", "ROMEO:", "--json", "--max_new_tokens", "8"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "ROMEO:" and len(line["tokens"]) == 8
    assert all(0 <= t < 384 for t in line["tokens"]) and line["text"] == saved.decode(line["tokens"])


def test_windows_shift_targets_by_one():
    ids = np.arange(103, dtype=np.int32)
    source = shakespeare.WindowSource(ids, seq_len=10)
    assert len(source) == 10  # (103 - 1) // 10
    for i in range(len(source)):
        window = source[i]
        assert {k: (v.dtype, v.shape) for k, v in window.items()} == {
            k: (np.dtype(np.int32), (10,)) for k in ("inputs", "targets", "loss_mask")}
        np.testing.assert_array_equal(window["inputs"], ids[i * 10:i * 10 + 10])
        np.testing.assert_array_equal(window["targets"], window["inputs"] + 1)
        np.testing.assert_array_equal(window["loss_mask"], 1)
    # Non-overlapping: the next window starts where this one's inputs ended.
    assert source[1]["inputs"][0] == source[0]["targets"][-1]
    with pytest.raises(IndexError):
        source[10]


def test_windows_last_target_is_the_last_id_when_lengths_fit():
    ids = np.arange(21, dtype=np.int32)  # (21 - 1) is a multiple of 5: nothing dropped
    source = shakespeare.WindowSource(ids, seq_len=5)
    assert len(source) == 4 and source[3]["targets"][-1] == 20


def test_windows_feed_a_grain_pipeline(text):
    tok = shakespeare.CharTokenizer.from_text(text)
    ids = shakespeare.encode_to_array(text[:20_000], tok)
    dataset = grain.MapDataset.source(shakespeare.WindowSource(ids, seq_len=64)).shuffle(seed=0)
    batch = next(iter(dataset.batch(4)))
    assert batch["inputs"].shape == (4, 64) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert tok.decode(batch["inputs"][0]) in text[:20_000]
