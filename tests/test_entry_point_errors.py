"""Every entry point answers a bad value with one line `PROG: error: ...` on stderr, exit status 2
and no traceback: each is run as a subprocess, the way a user runs it, on a table of wrong
arguments. The lmjax.main cases fail before training starts; the cases that need a trained run
share one tiny run (2 steps) made once for the module."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_facts_config, tiny_facts_overrides

FACTS = ROOT / "configs" / "facts.py"
MQAR = ROOT / "configs" / "mqar.py"


def run_module(module, *args, env, cwd=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result, prog, message):
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert message in lines[0], lines[0]


# -- lmjax.main: values the config check (or the run builder, before training) refuses -----------

def main_args(recipe, overrides, workdir):
    from lmjax.grid.spec import format_value

    return [f"--config={recipe}", *(f"--config.{k}={format_value(v)}" for k, v in overrides.items()),
            f"--workdir={workdir}"]


MAIN_CASES = [
    ({"optim.warmup_steps": -1}, "optim.warmup_steps must be 0 or more, got -1."),
    ({"optim.b1": 1.0}, "optim.b1 must be in [0, 1), got 1.0."),
    ({"optim.b2": -0.5}, "optim.b2 must be in [0, 1), got -0.5."),
    ({"optim.eps": 0.0}, "optim.eps must be a positive number, got 0.0."),
    ({"optim.weight_decay": -0.1}, "optim.weight_decay must be 0 or more, got -0.1."),
    ({"optim.clip_norm": -1.0}, "optim.clip_norm must be 0 or more (0 = no clipping), got -1.0."),
    ({"optim.min_lr_ratio": 1.5}, "optim.min_lr_ratio must be in [0, 1], got 1.5."),
    ({"optim.decay_fraction": -0.2}, "optim.decay_fraction must be in [0, 1], got -0.2."),
    ({"model.mlp_hidden": 0}, "model.mlp_hidden must be a positive number, got 0."),
    ({"implementation.model": "rnn", "model.mlp_hidden": -8}, "model.mlp_hidden must be 0 or more (0 = 3*dim), got -8."),
    ({"eval.batch_size": 0}, "eval.batch_size must be a positive number, got 0."),
    ({"data.alpha": 1.5}, "data.alpha must lie in [0, 1], got 1.5."),
    ({"data.num_unseen": -1}, "data.num_unseen must be a non-negative integer, got -1."),
    ({"train.seq_len": 40}, "but train.seq_len is 40; raise train.seq_len to at least "),
    ({"train.stop_when": "eval/qa_accuracy>=0.9"},
     "train.stop_when names 'eval/qa_accuracy', which the facts task never reports; it reports: eval/qa_acc, eval/qa_loss."),
    ({"train.stop_when": "eval/qa_recall>=0.9", "eval.recall": True},
     "train.stop_when names 'eval/qa_recall', which the facts task reports only after training"),
]


# One case of each kind of check stays in the default run: a config field (optim.warmup_steps), the
# run builder (train.seq_len) and the task (train.stop_when). The others are the same path with
# another message (~4 s of subprocess each; tests/test_config.py checks every message in-process).
DEFAULT_MAIN_CASES = ("optim.warmup_steps must be 0", "raise train.seq_len", "which the facts task never reports")


@pytest.mark.parametrize("overrides, message", [
    pytest.param(overrides, message, id=str(overrides),
                 marks=() if any(key in message for key in DEFAULT_MAIN_CASES) else pytest.mark.slow)
    for overrides, message in MAIN_CASES
])
def test_main_refuses_a_bad_value_in_one_line(overrides, message, tmp_path, subprocess_env):
    args = main_args(FACTS, tiny_facts_overrides(**overrides), tmp_path / "w")
    result = run_module("lmjax.main", *args, env=subprocess_env)
    assert_one_line_error(result, "lmjax", message)
    assert not (tmp_path / "w" / "checkpoints").exists()  # refused before training


def test_main_checks_stop_when_against_the_task_of_the_recipe(tmp_path, subprocess_env):
    overrides = {"train.stop_when": "eval/qa_acc>=0.9", "data.num_train": 64, "data.num_eval": 16}
    result = run_module("lmjax.main", *main_args(MQAR, overrides, tmp_path / "w"), env=subprocess_env)
    assert_one_line_error(result, "lmjax", "the mqar task never reports; it reports: eval/mqar_acc, "
                                           "eval/mqar_loss, eval/mqar_seq_acc.")


# -- the entry points that read runs ----------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny trained facts run (checkpoint at step 2), an mqar run folder with only its
    config.json, and a file: the folders the entry points are pointed at."""
    from lmjax.config import load_config_file, parse_config
    from lmjax.run_dir import write_run_config
    from lmjax.train.loop import train

    root = tmp_path_factory.mktemp("runs")
    train(tiny_facts_config(**{
        "train.steps": 2, "train.log_every": 2, "train.eval_every": 2, "checkpoint.every": 2, "train.stop_when": "",
        "logging.count_flops": False, "logging.tensorboard": False,
    }), root / "facts")
    (root / "mqar").mkdir()
    write_run_config(root / "mqar", parse_config(load_config_file(MQAR)))
    (root / "mqar" / "metrics.jsonl").write_text('{"step": 0, "model/params": 1}\nnot json\n')
    (root / "a_file").write_text("x")
    (root / "export").mkdir()
    (root / "export" / "model.safetensors").write_text("")
    (root / "grid.py").write_text(
        f"def get_grid():\n    return {{'config': {str(FACTS)!r}, 'root': {str(root / 'grid_runs')!r}, "
        f"'fixed': {{'optim.b1': 1.5}}, 'axes': {{'model.dim': [16]}}}}\n"
    )
    (root / "good_grid.py").write_text(
        f"def get_grid():\n    return {{'config': {str(FACTS)!r}, 'root': {str(root / 'grid_runs')!r}, "
        f"'axes': {{'model.dim': [16]}}}}\n"
    )
    return root


RUN_CASES = [
    ("lmjax.generate", ["--workdir", "{root}/nope", "--prompt", "hi"], "has no config.json"),
    ("lmjax.generate", ["--workdir", "{root}/facts"], "Give --prompt TEXT or --prompts FILE.jsonl."),
    ("lmjax.generate", ["--workdir", "{root}/facts", "--prompts", "{root}/nope.jsonl"], "No such file"),
    ("lmjax.generate", ["--workdir", "{root}/facts", "--prompt", "hi", "--step", "7"], "No checkpoint at step 7"),
    ("lmjax.generate", ["--workdir", "{root}/facts", "--prompt", "hi", "--mesh", "2"], "--mesh must look like DATAxMODEL"),
    ("lmjax.generate", ["--workdir", "{root}/facts", "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    ("lmjax.generate", ["--workdir", "{root}/facts", "--prompt", "hi", "--top_k", "-3"], "top_k must be a whole number >= 0"),
    ("lmjax.generate", ["--workdir", "{root}/facts", "--prompt", "hi", "--lanes", "0"], "must be positive"),
    ("lmjax.eval.recall", ["--workdir", "{root}/nope"], "has no config.json"),
    ("lmjax.eval.recall", ["--workdir", "{root}/mqar"], "Recall needs a facts run"),
    ("lmjax.eval.recall", ["--workdir", "{root}/facts", "--step", "7"], "No checkpoint at step 7"),
    ("lmjax.eval", ["--workdir", "{root}/nope", "--tasks", "facts_bio"], "has no config.json"),
    ("lmjax.eval", ["--workdir", "{root}/facts", "--tasks", "facts_recal"], "Unknown eval task 'facts_recal'; choose one of"),
    ("lmjax.eval", ["--workdir", "{root}/facts", "--tasks", "mqar"], "mqar needs an MQAR run"),
    ("lmjax.eval", ["--workdir", "{root}/facts", "--tasks", "multiple_choice={root}/nope.jsonl"], "is not a file"),
    ("lmjax.eval", ["--workdir", "{root}/facts", "--step", "7"], "No checkpoint at step 7"),
    ("lmjax.eval", ["--model", "{root}/a_file", "--tasks", "shakespeare_bpc"], "is not a .gguf file or a Hugging Face Llama folder"),
    ("lmjax.eval", ["--model", "{root}/a_file", "--step", "3"], "--step is for a run"),
    ("lmjax.export", ["--workdir", "{root}/nope", "--out", "{root}/out"], "has no config.json"),
    ("lmjax.export", ["--workdir", "{root}/facts", "--out", "{root}/out", "--step", "7"], "No checkpoint at step 7"),
    ("lmjax.export", ["--workdir", "{root}/facts", "--out", "{root}/a_file"], "is a file; give --out a folder."),
    ("lmjax.export", ["--workdir", "{root}/facts", "--out", "{root}/export"], "pass --overwrite"),
    ("lmjax.grid", ["{root}/nope.py"], "does not exist"),
    ("lmjax.grid", ["{root}/grid.py", "--dry_run"], "run 'dim=16,seed=0': optim.b1 must be in [0, 1), got 1.5."),
    ("lmjax.grid", ["{root}/good_grid.py", "--only", "dim=99"], "no run name contains 'dim=99'"),
    ("lmjax.grid", ["{root}/good_grid.py", "--parallel", "0"], "--parallel must be at least 1, got 0"),
    ("lmjax.grid", ["{root}/good_grid.py", "--launcher", "multihost"], "--launcher multihost needs --hosts N"),
    ("lmjax.results", ["{root}/nope", "--out", "{root}/table"], "No runs in"),
    ("lmjax.results", ["{root}/facts", "--out", "{root}/table", "--metric", "eval/nope"], "No run logged 'eval/nope'"),
    ("lmjax.results", ["{root}/facts", "--out", "{root}/table", "--group_by", "nope"], "No column 'nope' to group by"),
    ("lmjax.results", ["{root}/facts", "--out", "{root}/table", "--smooth", "1.5"], "--smooth must lie in [0, 1)"),
    ("lmjax.results", ["{root}/facts", "--out", "{root}/table", "--x", "nope"], "--x must be"),
    ("lmjax.monitor.sync", ["{root}/nope"], "does not exist."),
    ("lmjax.monitor.sync", ["{root}/a_file"], "is not a folder"),
    ("lmjax.monitor.sync", ["{root}/mqar"], "metrics.jsonl:2 is not a JSON object"),
    # Flags argparse itself refuses: one line too, not a usage block.
    ("lmjax.generate", ["--workdir", "{root}/facts", "--prompt", "hi", "--step", "abc"], "argument --step: invalid int value"),
    ("lmjax.eval.recall", [], "the following arguments are required: --workdir"),
    ("lmjax.export", ["--workdir", "{root}/facts", "--out", "{root}/out", "--bogus"], "unrecognized arguments: --bogus"),
    ("lmjax.grid", ["{root}/good_grid.py", "--launcher", "cloud"], "argument --launcher: invalid choice"),
    ("lmjax.results", ["{root}/facts"], "the following arguments are required: --out"),
    ("lmjax.monitor.sync", ["{root}/facts", "--mode", "later"], "argument --mode: invalid choice"),
]


@pytest.mark.slow  # ~50 subprocesses: run with -m slow (CI does); lmjax.main's table stays in the default run
@pytest.mark.parametrize("module, args, message", RUN_CASES,
                         ids=[f"{m} {' '.join(a)}".replace("{root}/", "") for m, a, _ in RUN_CASES])
def test_entry_point_refuses_a_bad_argument_in_one_line(module, args, message, runs, subprocess_env):
    result = run_module(module, *(a.format(root=runs) for a in args), env=subprocess_env, cwd=runs)
    assert_one_line_error(result, module, message)


def test_evaluators_declare_the_metrics_the_run_logged(runs):
    """What train.stop_when is checked against: the names the evaluators declare are the names
    the tiny run logged (and its checkpoint exists, so the cases above fail for their argument)."""
    from conftest import build_task

    from lmjax.run_dir import read_run_config

    config = read_run_config(runs / "facts")
    (evaluator,) = build_task(config, runs / "facts").evaluators
    rows = [json.loads(line) for line in (runs / "facts" / "metrics.jsonl").read_text().splitlines()]
    logged = {key for row in rows for key in row if key.startswith("eval/")}
    assert evaluator.metric_names() == sorted(logged) == ["eval/qa_acc", "eval/qa_loss"]
    assert (runs / "facts" / "checkpoints").is_dir()
