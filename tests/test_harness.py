"""lmjax/eval/harness.py: lmjax models in lm-evaluation-harness, on the local tasks of
tests/data/harness (one per request kind), against the harness's own `hf` backend on the same
weights and against RequestEvaluator's answers to the same requests built by hand."""
import importlib
import os
import sys
import types
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"  # everything here is local: a download attempt fails the test
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import tiny_facts_config, tiny_smollm_folder  # noqa: E402

from lmjax.eval.harness import LmjaxLM, run_harness  # noqa: E402
from lmjax.eval.requests import GenerateUntil, Loglikelihood, Rolling, cut_at_stop  # noqa: E402
from lmjax.extras import MissingExtra  # noqa: E402

TASK_DIR = Path(__file__).parent / "data" / "harness"
TASKS = ["lmjax_mc", "lmjax_rolling", "lmjax_gen"]
# Summed log-likelihoods of both backends, f32 forwards in a different order of operations: ~1e-5
# per token measured; 1e-3 on sums of tens of tokens leaves margin, while a token scored against
# the wrong context or a window cut one token off moves a sum by O(1).
TOL = 1e-3


def samples_by_doc(results, task):
    return {s["doc_id"]: s for s in results["samples"][task]}


def harness_answers(results):
    """{(task, doc_id): what the model answered}: [(logprob, greedy)] per choice, a log-likelihood, or a text."""
    out = {}
    for task in TASKS:
        for doc_id, s in samples_by_doc(results, task).items():
            resps = [r[0] for r in s["resps"]]
            out[task, doc_id] = resps if task == "lmjax_mc" else resps[0]
    return out


def assert_same_answers(ours, theirs, tol=TOL):
    """Equal answers doc by doc; returns the largest log-likelihood difference."""
    assert ours.keys() == theirs.keys()
    worst = 0.0
    for key in ours:
        a, b = ours[key], theirs[key]
        if key[0] == "lmjax_mc":
            assert [g for _, g in a] == [g for _, g in b], key
            worst = max(worst, *(abs(x - y) for (x, _), (y, _) in zip(a, b)))
        elif key[0] == "lmjax_rolling":
            worst = max(worst, abs(a - b))
        else:
            assert a == b, key
    assert worst < tol, worst
    return worst


def metrics(results):
    return {(task, name): value for task, row in results["results"].items() for name, value in row.items()
            if isinstance(value, float)}


def hf_backend(model_or_path, tokenizer=None, *, max_length, batch_size):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model_or_path, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                device="cpu", dtype="float32")


# -- lmjax's own answers to the same requests ---------------------------------------------------------


@pytest.fixture(scope="module")
def facts_run(tmp_path_factory):
    """A 4-step facts run (byte tokenizer, random-ish weights): the adapter on a training run."""
    from lmjax.train.loop import train

    workdir = tmp_path_factory.mktemp("facts_run")
    train(tiny_facts_config(**{"train.steps": 4, "checkpoint.every": 4, "train.eval_every": 4}), workdir)
    return workdir


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_run_answers_equal_request_evaluator_answers(facts_run):
    """Through the harness (tasks, prompts, context/continuation split, windows, stop strings)
    each answer equals RequestEvaluator's answer to the request written here from the doc."""
    from lmjax.eval.evaluator import load_subject

    window = 24  # shorter than the prompts: contexts lose their oldest bytes, texts span windows
    results = run_harness(f"workdir={facts_run},step=4,max_length={window},batch_size=4", TASK_DIR, TASKS, log_samples=True)
    ours = harness_answers(results)

    subject = load_subject(workdir=facts_run, step=4)
    tok = subject.tokenizer
    evaluator = subject.evaluator(seq_len=window, rows=4)
    expected = {}
    for doc_id, s in samples_by_doc(results, "lmjax_mc").items():
        doc = s["doc"]
        context = tok.encode(f"Question: {doc['question']}\nAnswer:")
        scores = evaluator.answer([Loglikelihood(context, tok.encode(" " + c)) for c in doc["choices"]])
        expected["lmjax_mc", doc_id] = [(x.logprob, x.greedy) for x in scores]
    for doc_id, s in samples_by_doc(results, "lmjax_rolling").items():
        (score,) = evaluator.answer([Rolling(tok.encode(s["doc"]["text"]), prefix=tok.eos_id)])  # no BOS: end-of-text
        expected["lmjax_rolling", doc_id] = score.logprob
    for doc_id, s in samples_by_doc(results, "lmjax_gen").items():
        until = ("\n", ".", ",", tok.decode([tok.eos_id]))
        context = tok.encode(s["doc"]["prompt"])[-(window - 12):]  # room for max_gen_toks=12, as hf leaves
        (generated,) = evaluator.answer([GenerateUntil(context, until, max_new_tokens=12)])
        # The text of the generated tokens without special tokens (as the hf backend decodes), cut at `until`.
        visible = [t for t in generated.tokens if t not in set(tok.special_tokens.values())]
        expected["lmjax_gen", doc_id] = cut_at_stop(tok.decode(visible), until)[0]
    assert_same_answers(ours, expected, tol=1e-6)  # the same jitted forward: equal up to summation order
    assert results["config"]["model"] == "lmjax" and results["results"]["lmjax_mc"]["acc,none"] is not None


def test_sampling_is_refused_with_a_clear_error(facts_run):
    lm = LmjaxLM(workdir=str(facts_run), max_length=24, batch_size=2)
    request = types.SimpleNamespace(args=("Hello", {"until": ["\n"], "do_sample": True, "temperature": 0.7}))
    with pytest.raises(ValueError, match="greedily only.*do_sample=True"):
        lm.generate_until([request])
    greedy = types.SimpleNamespace(args=("Hello", {"until": ["\n"], "temperature": 0.0, "max_gen_toks": 3}))
    assert isinstance(lm.generate_until([greedy])[0], str)


def test_without_the_extra_the_import_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # find_spec answers None, as when it is not installed
    monkeypatch.delitem(sys.modules, "lmjax.eval.harness")
    with pytest.raises(MissingExtra, match=r"'lm_eval' package.*pip install 'lmjax\[harness\]'"):
        importlib.import_module("lmjax.eval.harness")


# -- the harness's hf backend on the same weights -----------------------------------------------------


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_tiny_llama_folder_matches_the_hf_backend(tmp_path):
    """A random 2-layer Llama with SmolLM2's tokenizer (seconds), a 16-token window: every text
    spans windows, contexts are cut, generation keeps 4 context tokens."""
    folder = tiny_smollm_folder(tmp_path / "tiny")
    ours = run_harness(f"pretrained={folder},max_length=16,batch_size=4", TASK_DIR, TASKS, log_samples=True)
    theirs = run_harness(hf_backend(str(folder), max_length=16, batch_size=4), TASK_DIR, TASKS, log_samples=True)
    assert_same_answers(harness_answers(ours), harness_answers(theirs))
    assert metrics(ours).keys() == metrics(theirs).keys()
    for key, value in metrics(ours).items():
        assert value == pytest.approx(metrics(theirs)[key], rel=1e-4), key


@pytest.mark.slow  # two backends of a 135M model on 2 CPU cores
def test_smollm2_gguf_matches_the_hf_backend():
    """SmolLM2-135M from its GGUF: lmjax's import vs transformers' GGUF loader in the harness's
    hf backend; the same per-document log-likelihoods, greedy flags, accuracies and texts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmjax.interop.bundled import smollm2_gguf

    path = smollm2_gguf()
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    window = 40  # three of the four texts take two windows
    theirs = run_harness(hf_backend(model, tokenizer, max_length=window, batch_size=8), TASK_DIR, TASKS, log_samples=True)
    ours = run_harness(f"pretrained={path},max_length={window},batch_size=8", TASK_DIR, TASKS, log_samples=True)
    worst = assert_same_answers(harness_answers(ours), harness_answers(theirs))
    print(f"largest log-likelihood difference: {worst:.2e}")
    for key, value in metrics(ours).items():
        assert value == pytest.approx(metrics(theirs)[key], rel=1e-4), key
    assert metrics(ours)["lmjax_mc", "acc,none"] >= 0.5  # a real model: most answers right
    assert np.mean([t != "" for (task, _), t in harness_answers(ours).items() if task == "lmjax_gen"]) == 1
