"""lmjax/data/text.py and the text task: sources, windows, chats, and the config rules of
checkpoint.init_from."""
import json

import numpy as np
import pytest

from lmjax.config import base_recipe, parse_config
from lmjax.data import text
from lmjax.registry import ConfigError


class CodepointTokenizer:
    """One id per character (its code point) and an end-of-text id: easy to check by hand."""

    vocab_size = 1000
    eos_id = 999

    def encode(self, s):
        return [ord(c) for c in s]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_txt_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    corpus = text.read_source(str(tmp_path / "a.txt"))
    assert corpus == text.Corpus("text", ["hello\nworld\n"])


def test_jsonl_documents_and_both_chat_spellings(tmp_path):
    docs = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}])
    assert text.read_source(docs) == text.Corpus("text", ["one", "two"])
    chats = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"dialog": [{"source": "user", "content": "q"}, {"source": "assistant", "content": "a"}]},
    ])
    corpus = text.read_source(chats)
    assert corpus.kind == "chat"
    assert corpus.items[0] == [{"source": "system", "content": "be brief"}, {"source": "user", "content": "hi"},
                               {"source": "assistant", "content": "hello"}]
    assert corpus.items[1] == [{"source": "user", "content": "q"}, {"source": "assistant", "content": "a"}]


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a"}', '{"messages": [{"role": "assistant", "content": "b"}]}'], "mixes documents"),
    (['{"text": "a"}', "not json"], ":2 is not JSON"),
    (['{"messages": [{"role": "user", "content": "q"}]}'], "at least one assistant turn"),
    (['{"messages": [{"role": "robot", "content": "q"}]}'], "every turn needs a role"),
    (['{"title": "x"}'], "none of 'text', 'messages', 'dialog'"),
    ([], "holds no records"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        text.read_source(str(path))


def test_other_sources_are_refused(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="expected a .txt or .jsonl"):
        text.read_source(str(tmp_path / "a.csv"))
    with pytest.raises(ValueError, match="neither 'shakespeare' nor an existing"):
        text.read_source(str(tmp_path / "missing.txt"))


def test_documents_are_joined_by_end_of_text_and_split_at_the_tail():
    ids = text.document_ids(["ab", "c"], CodepointTokenizer())
    assert ids.tolist() == [97, 98, 999, 99, 999]
    train, val = text.split_ids(np.arange(100), 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))


def recipe(**overrides):
    c = base_recipe("text")
    c.model = dict(vocab_size=1000, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=32)
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def test_text_task_needs_weights_to_start_from():
    with pytest.raises(ConfigError, match="set checkpoint.init_from"):
        parse_config(recipe())


def test_init_from_is_refused_for_tasks_with_their_own_tokenizer():
    from conftest import tiny_facts_recipe

    c = tiny_facts_recipe()
    c.checkpoint.init_from = "model.gguf"
    with pytest.raises(ConfigError, match="makes its own tokenizer"):
        parse_config(c)


def test_unknown_loss_mask_and_missing_source_are_config_errors(tmp_path):
    from lmjax.tasks import text as text_task

    with pytest.raises(ConfigError, match="Unknown data.loss_mask 'answers'"):
        text_task.check(text_task.Section(loss_mask="answers"), vocab_size=10, seq_len=8)
    with pytest.raises(ConfigError, match="neither 'shakespeare' nor an existing"):
        text_task.check(text_task.Section(source=str(tmp_path / "none.txt")), vocab_size=10, seq_len=8)
