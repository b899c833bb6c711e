"""lmjax/eval/tasks and `python -m lmjax.eval`: each task against an independent reference (the
trainer's own evaluators on the same parameters, a brute-force forward pass), and the CLI's facts
recall against the recall the trainer measured at the end of training."""
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ROOT, build_task, tiny_facts_config  # noqa: E402
from test_eval_requests import brute_loglikelihood, brute_rolling  # noqa: E402

from lmjax.eval import EvalEnv  # noqa: E402
from lmjax.eval.evaluator import RequestEvaluator, Subject  # noqa: E402
from lmjax.eval.tasks import TaskError, make_tasks, parse_task_list, run_tasks  # noqa: E402
from lmjax.models import build_model  # noqa: E402


def random_subject(config, workdir, seed=0):
    model = build_model(config.model)
    params = model.init(jax.random.PRNGKey(seed), np.zeros((1, 8), np.int32))["params"]
    from lmjax.run_dir import run_tokenizer

    return Subject(model, params, run_tokenizer(config, workdir), config, workdir, 0)


def evaluate(subject, tasks, limit=None, seq_len=None, **options):
    tasks = make_tasks(subject, parse_task_list(tasks), limit)
    return run_tasks(tasks, subject.evaluator(seq_len=seq_len, **options))


def trainer_metrics(task, subject):
    """The metrics of the trainer's own periodic evaluators (lmjax/tasks/) on the subject's parameters."""
    metrics = {}
    for evaluator in task.evaluators:
        if not evaluator.at_end:
            evaluator.prepare(EvalEnv(subject.model))
            metrics.update(evaluator(subject.params))
    return metrics


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_facts_bio_equals_the_bio_modes_stored_bits_evaluator(tmp_path):
    config = tiny_facts_config(**{"data.mode": "bio", "eval.recall": False, "train.seq_len": 160})
    task = build_task(config, tmp_path)
    subject = random_subject(config, tmp_path)
    expected = trainer_metrics(task, subject)
    got = evaluate(subject, "facts_bio")
    assert {k for k in got if k.startswith("eval/")} == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-5), name


def test_mqar_equals_the_trainers_token_accuracy(tmp_path):
    from lmjax.config import load_config_file, parse_config
    from lmjax.tasks import TASKS

    config = parse_config(load_config_file(ROOT / "configs" / "mqar.py", {
        "data.vocab_size": 32, "data.seq_len": 24, "data.num_kv_pairs": 3, "data.num_eval": 40, "model.dim": 32,
        "model.mlp_hidden": 64, "model.n_layers": 1,
    }.items()))
    task = TASKS.get("mqar").build(config.data, workdir=tmp_path, seq_len=config.train.seq_len, eval_cfg=config.eval,
                                   vocab_size=config.model.vocab_size)
    subject = random_subject(config, tmp_path, seed=4)
    expected = trainer_metrics(task, subject)
    got = evaluate(subject, "mqar")
    assert 0 < got["eval/mqar_acc"] < 1
    assert got["eval/mqar_acc"] == pytest.approx(expected["eval/mqar_acc"])
    assert got["eval/mqar_seq_acc"] == pytest.approx(expected["eval/mqar_seq_acc"])
    assert got["eval/mqar_loss"] == pytest.approx(expected["eval/mqar_loss"], rel=1e-5)


def shakespeare_subject(tmp_path):
    from lmjax.config import load_config_file, parse_config

    config = parse_config(load_config_file(ROOT / "configs" / "shakespeare.py", {
        "model.dim": 32, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 1, "model.mlp_hidden": 64,
        "train.seq_len": 32,
    }.items()))
    return random_subject(config, tmp_path, seed=2)


@pytest.mark.slow  # 17-20 s on two cores: in the slow run, which CI runs too
def test_shakespeare_bpc_is_rolling_bits_over_the_characters_of_the_validation_split(tmp_path):
    from lmjax.data import shakespeare

    subject = shakespeare_subject(tmp_path)
    _, val_text = shakespeare.split_train_val(shakespeare.load_text(), subject.config.data.val_fraction)
    whole, = make_tasks(subject, parse_task_list("shakespeare_bpc")).values()
    assert whole.requests()[0].tokens == tuple(subject.tokenizer.encode(val_text))  # every character, not windows of it

    got = evaluate(subject, "shakespeare_bpc", limit=150)
    tokens = subject.tokenizer.encode(val_text[:150])
    logprob, _, n = brute_rolling(subject.model, subject.params, tokens, None, 32)
    assert got["eval/shakespeare_tokens"] == n == 149  # characters: the first is context only
    assert got["eval/shakespeare_bpc"] == pytest.approx(-logprob / math.log(2) / 149, rel=1e-5)
    assert got["eval/shakespeare_loss"] == pytest.approx(-logprob / 149, rel=1e-5)


def test_multiple_choice_picks_the_likeliest_choice_raw_and_per_character(tmp_path):
    subject = shakespeare_subject(tmp_path)
    questions = [
        {"context": "ROMEO: O", "choices": [" Juliet", " my love, my dear", "h"], "gold": 0},
        {"context": "To be or not", "choices": [" to be", " two bee", "o"], "gold": 2},
        {"context": "\n", "choices": ["First", "Enter KING"], "gold": 1},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    got = evaluate(subject, f"multiple_choice={path}")
    tokenizer = subject.tokenizer
    acc = acc_norm = 0
    for q in questions:
        scores = []
        for choice in q["choices"]:
            context = tokenizer.encode(q["context"])
            scores.append(brute_loglikelihood(subject.model, subject.params, context, tokenizer.encode(choice), 32)[0])
        acc += int(np.argmax(scores)) == q["gold"]
        acc_norm += int(np.argmax(np.array(scores) / [len(c) for c in q["choices"]])) == q["gold"]
    assert got["eval/mc_mc_acc"] == pytest.approx(acc / 3) and got["eval/mc_mc_acc_norm"] == pytest.approx(acc_norm / 3)

    path.write_text('{"context": "a", "choices": ["b"], "gold": 0}\n')
    with pytest.raises(TaskError, match=r"mc.jsonl:1 is not"):
        evaluate(subject, f"multiple_choice={path}")


def test_facts_mc_offers_four_values_of_the_asked_attribute_with_the_truth_at_gold(tmp_path):
    config = tiny_facts_config()
    build_task(config, tmp_path)
    subject = random_subject(config, tmp_path)
    task, = make_tasks(subject, parse_task_list("facts_mc")).values()
    assert len(task.questions) == 32
    for q in task.questions:
        assert len(set(q["choices"])) == 4 and all(s.endswith(f"{c}.") for s, c in zip(q["sentences"], q["choices"]))
    assert len({q["gold"] for q in task.questions}) > 1  # the truth is not always in one place
    got = evaluate(subject, "facts_mc")
    assert 0 <= got["eval/facts_mc_acc"] <= 1 and "eval/facts_mc_acc_norm" in got


def test_tasks_that_do_not_fit_the_subject_are_one_line_errors(tmp_path):
    subject = shakespeare_subject(tmp_path)
    for name, message in [("facts_recall", "needs a facts run"), ("mqar", "needs an MQAR run"),
                          ("multiple_choice", "needs its questions")]:
        with pytest.raises(TaskError, match=message):
            make_tasks(subject, parse_task_list(name))
    with pytest.raises(TaskError, match="Unknown eval task 'facts_recal'; choose one of: facts_bio"):
        parse_task_list("facts_recal")


def test_in_tool_runs_answer_with_the_real_database(tmp_path):
    config = tiny_facts_config(**{"data.mode": "tool", "train.seq_len": 160})
    build_task(config, tmp_path)
    subject = random_subject(config, tmp_path)
    task, = make_tasks(subject, parse_task_list("facts_recall")).values()
    assert set(task.records) == {"qa", "qa_unseen"}
    request = task.requests()[0]
    reply = request.tool("```sql\nFIND birth_date FOR " + _first_name(task) + "\n```")
    assert reply == task.records["qa"][0]["answer"]  # the database of the run's data folder


def _first_name(task):
    question = task.records["qa"][0]["dialog"][0]["content"]  # "When was NAME born?"
    return question[len("When was "):-len(" born?")]


@pytest.mark.slow  # a 300-step training run (~50 s): CI runs it with -m slow
def test_cli_facts_recall_equals_the_end_of_training_recall(tmp_path):
    from lmjax.eval.__main__ import main
    from lmjax.train.loop import train

    config = tiny_facts_config(**{
        "eval.recall": True, "eval.recall_lanes": 8, "train.steps": 300, "train.eval_every": 300, "checkpoint.every": 300,
        "optim.lr": 1e-2, "model.dim": 64, "model.n_layers": 2, "train.seq_len": 128, "train.batch_size": 8,
    })
    summary = train(config, tmp_path)
    assert main(["--workdir", str(tmp_path), "--tasks", "facts_recall", "--no_progress"]) == 0
    results = json.loads((tmp_path / "eval" / "300" / "results.json").read_text())
    assert results["step"] == 300 and results["tasks"] == ["facts_recall"]
    assert 0 < summary["eval/qa_recall"] < 1  # a test that could tell them apart
    assert results["metrics"]["eval/qa_recall"] == summary["eval/qa_recall"]
    assert results["metrics"]["eval/qa_recall_suffix"] == summary["eval/qa_recall_suffix"]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 300 and last["eval/qa_recall"] == summary["eval/qa_recall"]


def test_cli_bad_task_is_one_line_and_status_2(tmp_path, capsys):
    from lmjax.eval.__main__ import main

    assert main(["--workdir", str(tmp_path), "--tasks", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmjax.eval: error: Unknown eval task 'nope'") and err.count("\n") == 1


def test_cli_on_an_hf_folder_gives_the_bits_per_character_of_transformers(tmp_path):
    """`--model FOLDER`: shakespeare_bpc on the first 300 characters, in one window, against the
    same weights run by HF transformers."""
    import torch
    import transformers

    from conftest import tiny_smollm_folder
    from lmjax.data import shakespeare
    from lmjax.data.tokenizers import pretrained_tokenizer
    from lmjax.eval.__main__ import main

    folder = tiny_smollm_folder(tmp_path / "llama")
    assert main(["--model", str(folder), "--tasks", "shakespeare_bpc", "--limit", "300", "--seq_len", "256",
                 "--out", str(tmp_path / "out"), "--no_progress"]) == 0
    got = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]

    text = shakespeare.split_train_val(shakespeare.load_text(), 0.05)[1][:300]
    tokenizer = pretrained_tokenizer(folder)
    prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ids = torch.tensor([prefix + tokenizer.encode(text)])
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        log_probs = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
    logprob = log_probs.gather(-1, ids[0, 1:, None])[:, 0].sum().item()
    scored_chars = len(text) if prefix else len(text) - len(tokenizer.decode(ids[0, :1].tolist()))
    assert got["eval/shakespeare_tokens"] == ids.shape[1] - 1
    assert got["eval/shakespeare_bpc"] == pytest.approx(-logprob / math.log(2) / scored_chars, rel=1e-4)
