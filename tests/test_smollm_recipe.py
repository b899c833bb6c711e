"""configs/smollm.py end to end, on a tiny random Llama with SmolLM2's real tokenizer (so it runs
in seconds): imported weights train on text and on chats, on one device and on an FSDP x TP mesh,
and the run's checkpoints generate and export like any run.

The reference for the imported start is transformers: with a learning rate too small to move
an f32 weight, the run's first `eval/loss` must equal the mean loss transformers computes on
the same held-out windows, tokenized by transformers' own tokenizer.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from conftest import ROOT, tiny_smollm_folder

SEQ_LEN = 32


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_smollm_folder(tmp_path_factory.mktemp("tiny_smollm"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    text = "".join(f"Line {i}: the {i % 7}th verse of {i * 13} words, sung twice.\n" for i in range(300))
    (folder / "notes.txt").write_text(text)
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(40)]
    (folder / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return folder


def run_main(workdir, *overrides, devices=1, seq_len=SEQ_LEN):
    env_flags = f"--xla_force_host_platform_device_count={devices}"
    args = [
        sys.executable, "-m", "lmjax.main", "--config=configs/smollm.py", f"--workdir={workdir}",
        f"--config.train.seq_len={seq_len}", "--config.train.batch_size=4", "--config.eval.batch_size=4",
        "--config.eval.max_batches=2", "--config.logging.progress_bar=False", "--config.logging.count_flops=False",
        "--config.checkpoint.async_save=False", *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": env_flags}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def first_eval_loss(metrics):
    return next(m["eval/loss"] for m in metrics if "eval/loss" in m)


def reference_val_loss(folder, text, val_fraction=0.05, max_windows=8):
    """transformers' mean next-token loss on the windows the text task holds out: the text's ids
    (transformers' tokenizer, end-of-text after the document), the last val_fraction of them,
    windows of SEQ_LEN + 1 ids, evenly spaced, at most max_windows."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    val = np.asarray(ids[int(len(ids) * (1 - val_fraction)):])
    n_windows = (len(val) - 1) // SEQ_LEN
    picks = np.linspace(0, n_windows - 1, min(n_windows, max_windows)).astype(int)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for i in picks:
            window = torch.as_tensor(val[i * SEQ_LEN: i * SEQ_LEN + SEQ_LEN + 1])[None]
            logits = model(window[:, :-1]).logits
            losses.append(torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="none"))
    return float(torch.cat(losses).mean())


FROZEN = ("--config.optim.lr=1e-30", "--config.optim.warmup_steps=0", "--config.train.steps=1", "--config.train.eval_every=1")


MESH = ("--config.parallel.data=2", "--config.parallel.model=2", "--config.parallel.fsdp=True")


@pytest.mark.parametrize("devices, mesh", [(1, ()), pytest.param(4, MESH, marks=pytest.mark.slow)])
def test_imported_start_matches_transformers_loss(tmp_path, tiny_folder, corpus, devices, mesh):
    metrics = run_main(tmp_path / "run", f"--config.checkpoint.init_from={tiny_folder}",
                       f"--config.data.source={corpus / 'notes.txt'}", *FROZEN, *mesh, devices=devices)
    expected = reference_val_loss(tiny_folder, (corpus / "notes.txt").read_text())
    # f32 on both sides, summed in different orders over a 49k vocabulary: agreement to ~1e-5.
    assert first_eval_loss(metrics) == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_chat_fine_tuning_on_assistant_tokens_learns_and_generates_and_exports(tmp_path, tiny_folder, corpus):
    from lmjax.generate.api import Generator
    from lmjax.interop.hf import export_run_hf

    workdir = tmp_path / "chat"
    metrics = run_main(workdir, f"--config.checkpoint.init_from={tiny_folder}", f"--config.data.source={corpus / 'chats.jsonl'}",
                       "--config.data.loss_mask=assistant", "--config.optim.lr=1e-2", "--config.train.steps=30",
                       "--config.train.eval_every=15", "--config.checkpoint.every=15", seq_len=64)
    losses = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert len(losses) == 2 and losses[1] < losses[0]
    # The run folder keeps SmolLM2's tokenizer and its chat format: generation needs nothing else.
    generator = Generator.from_workdir(workdir, lanes=1, max_len=64)
    assert generator.format.name == "chatml"
    [completion] = generator.generate(["What is 3 plus 3?"], max_new_tokens=8)
    assert completion.tokens and completion.finish_reason in ("stop", "length")
    out = export_run_hf(workdir, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = generator.tokenizer.encode("What is 12 plus 345?")
    assert hf_tok("What is 12 plus 345?", add_special_tokens=False)["input_ids"] == ids
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_model(torch.as_tensor([ids])).logits[0].numpy()
    ours = np.asarray(generator.engine.decoder.model.apply({"params": generator.engine.params}, np.asarray([ids], np.int32)))[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
