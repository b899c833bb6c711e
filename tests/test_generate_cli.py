"""`python -m lmjax.generate` and `python -m lmjax.eval.recall` on a real (tiny) training run."""
import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_facts_config

from lmjax.data.facts import read_dialogs
from lmjax.tools.facts_db import FactsDatabase

pytestmark = pytest.mark.slow  # a 150-step training run and CLI subprocesses, ~3 min; tests/test_tool_call.py covers the same tool calls in-process

STEPS = 150  # enough for a 2-layer d=32 model to learn the 8 in-tool dialogs of 2 people by heart


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory):
    from lmjax.train.loop import train

    workdir = tmp_path_factory.mktemp("tool_run")
    config = tiny_facts_config(**{
        "data.mode": "tool", "data.num_people": 2, "data.num_unseen": 2, "data.tool_practice_people": 0,
        "model.n_layers": 2, "train.steps": STEPS, "train.seq_len": 160, "train.batch_size": 8, "train.log_every": 50,
        "train.eval_every": STEPS, "train.stop_when": "", "checkpoint.every": STEPS, "optim.lr": 1e-2,
        "optim.warmup_steps": 10, "eval.recall": True,
    })
    summary = train(config, workdir)
    return workdir, summary


def trained_dialogs(workdir):
    """The run's facts folder and its in-tool dialogs (the ones the model learnt)."""
    (folder,) = (workdir / "data").glob("facts-*")
    return folder, read_dialogs(folder / "qatool.jsonl")


def run(module, *args, env):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=300)


def test_training_ends_with_recall_through_generation(tool_run):
    workdir, summary = tool_run
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    recall = [line for line in lines if "eval/qa_recall" in line]
    assert len(recall) == 1 and recall[0]["step"] == STEPS
    assert recall[0]["eval/qa_recall"] == 1.0 == summary["eval/qa_recall"]  # every trained fact, through the tool
    assert recall[0]["eval/qa_recall_suffix"] == 1.0  # the original's looser rule, under its own name
    assert 0.0 <= recall[0]["eval/qa_unseen_recall"] <= recall[0]["eval/qa_unseen_recall_suffix"] <= 1.0


def test_generate_cli_prints_completions_with_tool_calls(tool_run, subprocess_env):
    workdir, _ = tool_run
    folder, dialogs = trained_dialogs(workdir)
    asked = dialogs[1::3]  # two questions about each of the two people
    out = run("lmjax.generate", "--workdir", str(workdir), "--tools", "facts", "--tool_timeout_s", "30", "--json",
              "--max_new_tokens", "120", *(arg for d in asked for arg in ("--prompt", d["dialog"][0]["content"])),
              env=subprocess_env)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == [d["dialog"][0]["content"] for d in asked]
    with FactsDatabase(folder / "people.db") as database:
        for row, dialog in zip(rows, asked):
            query, reply, answer = (turn["content"] for turn in dialog["dialog"][1:])
            (call,) = row["tool_calls"]
            assert call["query"] == query and call["ok"]  # the query the model wrote
            assert call["reply"] == database.run(query) == dialog["answer"]  # the real database's value
            assert row["text"] == f"{query}<|database|>{call['reply']}<|assistant|>{answer}<|eod|>"
            assert row["finish_reason"] == "stop"


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "Prompt 0 is empty"),
    (["--prompt", "x" * 500], "has 502 tokens but the cache holds 160"),
    (["--prompt", "hi", "--top_p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", "hi", "--tools", "calculator"], "Unknown tools 'calculator' in tools; choose one of: facts."),
    (["--prompt", "hi", "--step", "3"], "No checkpoint at step 3"),
    (["--prompt", "hi", "--mesh", "4by2"], "--mesh must look like DATAxMODEL"),
    (["--prompt", "hi", "--mesh", "3x1"], "parallel.data x parallel.model = 3 x 1 = 3 devices, but there are 1"),
    (["--prompt", "hi", "--tools", "facts", "--tool_timeout_s", "0"], "tool_timeout_s must be a positive, finite number"),
])
def test_generate_cli_errors_are_one_line(tool_run, subprocess_env, args, message):
    workdir, _ = tool_run
    out = run("lmjax.generate", "--workdir", str(workdir), *args, env=subprocess_env)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("lmjax.generate: error:") and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_generate_cli_hands_its_tool_timeout_to_the_generator(monkeypatch, capsys):
    from lmjax.generate.__main__ import main
    from lmjax.generate.api import Generator

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the entry point tunes it; restored after
    seen = {}

    def from_workdir(workdir, **options):
        seen.update(options, workdir=workdir)
        raise ValueError("stop before loading anything")

    monkeypatch.setattr(Generator, "from_workdir", from_workdir)
    assert main(["--workdir", "W", "--tools", "facts", "--tool_timeout_s", "0.25", "--prompt", "hi"]) == 2
    assert seen["tool_timeout_s"] == 0.25 and seen["tools"] == "facts" and seen["workdir"] == "W"
    assert main(["--workdir", "W", "--prompt", "hi"]) == 2
    assert seen["tool_timeout_s"] == 5.0  # the default, as in the Python API
    assert "stop before loading anything" in capsys.readouterr().err


def test_generate_cli_refuses_a_folder_without_a_run(tmp_path, subprocess_env):
    out = run("lmjax.generate", "--workdir", str(tmp_path), "--prompt", "hi", env=subprocess_env)
    assert out.returncode == 2 and "has no config.json" in out.stderr


def test_recall_cli_on_a_checkpoint(tool_run, subprocess_env):
    workdir, _ = tool_run
    out = run("lmjax.eval.recall", "--workdir", str(workdir), "--limit", "4", "--lanes", "2", env=subprocess_env)
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(metrics) >= {"eval/qa_recall", "eval/qa_unseen_recall", "eval/qa_recall_suffix", "eval/qa_unseen_recall_suffix"}


def test_generate_cli_on_a_two_device_mesh_prints_the_one_device_tokens(tool_run, subprocess_env):
    workdir, _ = tool_run
    args = ["--workdir", str(workdir), "--tools", "facts", "--json", "--max_new_tokens", "40", "--lanes", "2",
            "--prompt", "When was Ada born?", "--prompt", "Where does Bo live?"]
    one = run("lmjax.generate", *args, env=subprocess_env)
    two_devices = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    meshed = run("lmjax.generate", *args, "--mesh", "2x1", env=two_devices)
    assert one.returncode == 0 and meshed.returncode == 0, meshed.stderr
    assert [json.loads(line)["tokens"] for line in meshed.stdout.splitlines()] == \
        [json.loads(line)["tokens"] for line in one.stdout.splitlines()]
