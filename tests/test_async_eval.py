"""lmjax.eval.follow: asynchronous evaluation of every saved checkpoint, outside the trainer.

The follower's own tests use stand-in checkpoints (folders with orbax's commit marker) and a
stand-in eval command (LMJAX_EVAL_COMMAND: a small python script that writes results.json and
appends its metrics row, as the eval CLI does, or crashes or kills itself on the steps asked), so
they need no JAX and run in seconds. The training tests run the tiny facts run with the follower
beside it: once with the stand-in eval (metrics per step, a killed eval, bit-identical losses,
rotation with checkpoint.keep=1) and once with the real `python -m lmjax.eval`.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, tiny_facts_config, tiny_facts_overrides
from lmjax.eval import follow

TIMING_KEYS = ("train/tokens_per_s", "train/step_time_s", "time/since_start_s", "time/recall_s")

# The stand-in eval: argv workdir step tasks attempt. STANDIN_KILL / STANDIN_CRASH: comma-separated
# steps whose first attempt kills itself with SIGKILL mid-way / whose every attempt exits 1.
STANDIN = r'''
import json, os, signal, sys, time
from pathlib import Path
workdir, step, tasks, attempt = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
listed = lambda name: step in [int(s) for s in os.environ.get(name, "").split(",") if s]
print(f"stand-in eval of step {step}, attempt {attempt}", flush=True)
checkpoint = workdir / "checkpoints" / str(step)
if not (checkpoint / "commit_success.txt").is_file():
    sys.exit(f"checkpoint {step} is gone")
time.sleep(float(os.environ.get("STANDIN_SECONDS", "0.05")))
if listed("STANDIN_KILL") and attempt == 1:
    print("half-way", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
if listed("STANDIN_CRASH"):
    sys.exit("stand-in crash")
out = workdir / "eval" / str(step)
out.mkdir(parents=True, exist_ok=True)
metrics = {"eval/stand_in": step + 0.5, "eval/files": len(list(checkpoint.iterdir()))}
(out / ".results.json.tmp").write_text(json.dumps({"step": step, "tasks": tasks.split(","), "metrics": metrics, "seconds": 0.0}))
os.replace(out / ".results.json.tmp", out / "results.json")
with open(workdir / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": step, **metrics}) + "\n")
'''


@pytest.fixture
def standin_eval(tmp_path, monkeypatch):
    """LMJAX_EVAL_COMMAND set to the stand-in eval; returns a function setting which steps it kills or crashes."""
    script = tmp_path / "standin_eval.py"
    script.write_text(STANDIN)
    monkeypatch.setenv(follow.COMMAND_ENV, f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{workdir}} {{step}} {{tasks}} {{attempt}}")

    def configure(kill=(), crash=(), seconds=0.05):
        monkeypatch.setenv("STANDIN_KILL", ",".join(map(str, kill)))
        monkeypatch.setenv("STANDIN_CRASH", ",".join(map(str, crash)))
        monkeypatch.setenv("STANDIN_SECONDS", str(seconds))

    configure()
    return configure


def fake_checkpoint(workdir, step):
    folder = workdir / "checkpoints" / str(step)
    folder.mkdir(parents=True)
    (folder / "state").write_text("params")
    (folder / "commit_success.txt").write_text("done")


def eval_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "eval/stand_in" in row]


def train_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS and not k.startswith("perf/")}
            for row in rows if "eval/stand_in" not in row]


def follower_pid(workdir, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = follow._read_json(follow.eval_dir(workdir) / follow.FOLLOWER)
        if record:
            return record["pid"]
        time.sleep(0.02)
    raise AssertionError("no follower started")


# --- the follower, with stand-in checkpoints ----------------------------------------------------------

def test_follower_evaluates_each_step_in_order_retries_a_killed_eval_and_skips_a_crashing_one(tmp_path, standin_eval):
    standin_eval(kill=[2], crash=[3])
    workdir = tmp_path / "run"
    (workdir / "metrics.jsonl").parent.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("")
    for step in (1, 2):
        fake_checkpoint(workdir, step)
    side = follow.TrainerSide(workdir, "facts_recall", resumed_from=None)
    for step in (3, 4):  # saved while the follower runs
        time.sleep(0.3)
        fake_checkpoint(workdir, step)
    side.ended(finished=False)  # interrupted: nothing is pruned
    statuses = follow.wait(workdir, timeout=60)
    assert statuses == {1: "done", 2: "done", 3: "skipped", 4: "done"}
    assert [(row["step"], row["eval/stand_in"]) for row in eval_rows(workdir)] == [(1, 1.5), (2, 2.5), (4, 4.5)]
    killed = json.loads((workdir / "eval" / "2" / "failed.json").read_text())
    assert [a["how"] for a in killed["attempts"]] == ["killed by SIGKILL"] and not killed["skipped"]
    assert killed["attempts"][0]["log_tail"][-1] == "half-way"
    crashed = json.loads((workdir / "eval" / "3" / "failed.json").read_text())
    assert crashed["skipped"] and [a["how"] for a in crashed["attempts"]] == ["exited with status 1"] * 2
    log = (workdir / "eval" / "follow.log").read_text()
    assert "step 2: eval killed by SIGKILL" in log and "will retry" in log and re.search(r"step 2: evaluated in [0-9.]+ s \(attempt 2\)", log)
    assert "step 3: eval exited with status 1" in log and "skipped" in log and "stand-in crash" in log
    assert "3 evaluated, 1 skipped" in log
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [1, 2, 3, 4]


def test_a_follower_exits_when_its_trainer_dies_and_the_trainer_restarts_a_killed_follower(tmp_path, standin_eval):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"checkpoint": {"keep": 1}}))
    fake_checkpoint(workdir, 1)
    side = follow.TrainerSide(workdir, "facts_recall", resumed_from=None)
    first = follower_pid(workdir)
    while follow.step_status(workdir, 1) != "done":
        time.sleep(0.05)
    os.kill(first, signal.SIGKILL)
    side.proc.wait()
    side.check()  # as the training loop does between steps: started again
    second = follower_pid(workdir)
    assert second != first and psutil.pid_exists(second)
    fake_checkpoint(workdir, 2)
    fake_checkpoint(workdir, 3)
    side.ended(finished=True)
    assert follow.wait(workdir, timeout=60) == {1: "done", 2: "done", 3: "done"}
    # a finished run: the evaluated steps that rotation kept for the evals are deleted (keep=1)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3]

    # A trainer that dies without saying so (SIGKILL): its follower evaluates what was saved and exits.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = tmp_path / "other"
    fake_checkpoint(other, 5)
    follow._write_json(other / "eval" / follow.TRAINER, {"pid": dead.pid, "pid_created": 0.0, "host": os.uname().nodename})
    done = subprocess.run([sys.executable, "-m", "lmjax.eval.follow", "--workdir", str(other), "--tasks", "facts_recall",
                           "--poll", "0.05"], capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    assert follow.statuses(other) == {5: "done"} and "1 evaluated, 0 skipped" in done.stdout


def test_resuming_forgets_the_evals_of_steps_it_will_save_again(tmp_path, standin_eval):
    workdir = tmp_path / "run"
    for step in (4, 8):
        (workdir / "eval" / str(step)).mkdir(parents=True)
        (workdir / "eval" / str(step) / "results.json").write_text("{}")
    side = follow.TrainerSide(workdir, "facts_recall", resumed_from=4, launch=False)
    side.ended(finished=True)
    assert follow.statuses(workdir) == {4: "done"}
    assert json.loads((workdir / "eval" / "trainer.json").read_text())["finished"] is True


# --- training with the follower beside it ----------------------------------------------------------

@pytest.fixture(scope="module")
def runs_with_and_without_async_eval(tmp_path_factory):
    """The tiny facts run (checkpoints at 4, 8, 12) trained twice: without, and with async eval whose
    stand-in kills itself mid-way at step 8's first attempt."""
    root = tmp_path_factory.mktemp("async")
    from lmjax.train.loop import train

    train(tiny_facts_config(), root / "plain")
    script = root / "standin_eval.py"
    script.write_text(STANDIN)
    env = {follow.COMMAND_ENV: f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{workdir}} {{step}} {{tasks}} {{attempt}}",
           "STANDIN_KILL": "8", "STANDIN_SECONDS": "0.5"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        start = time.time()
        summary = train(tiny_facts_config(**{"eval.async_tasks": "facts_recall"}), root / "async")
        trained_s = time.time() - start
        statuses = follow.wait(root / "async", timeout=120)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return root / "plain", root / "async", summary, statuses, trained_s


def test_each_checkpoint_is_evaluated_with_its_step_and_a_killed_eval_never_stops_training(runs_with_and_without_async_eval):
    plain, workdir, summary, statuses, _ = runs_with_and_without_async_eval
    assert summary["step"] == 12 and not summary["interrupted"]
    assert json.loads((workdir / "summary.json").read_text())["step"] == 12
    assert statuses == {4: "done", 8: "done", 12: "done"}
    assert [row["step"] for row in eval_rows(workdir)] == [4, 8, 12]  # in order, each with its checkpoint's step
    assert all(row["eval/stand_in"] == row["step"] + 0.5 for row in eval_rows(workdir))
    killed = json.loads((workdir / "eval" / "8" / "failed.json").read_text())
    assert killed["attempts"][0]["how"] == "killed by SIGKILL"
    assert "step 8: eval killed by SIGKILL" in (workdir / "eval" / "follow.log").read_text()
    assert json.loads((workdir / "eval" / "trainer.json").read_text())["finished"] is True


def test_async_eval_leaves_the_losses_bit_identical(runs_with_and_without_async_eval):
    plain, workdir, *_ = runs_with_and_without_async_eval
    rows = train_rows(workdir)
    assert any("train/loss" in row for row in rows)
    assert rows == train_rows(plain)


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_rotation_keeps_each_checkpoint_until_its_eval_has_read_it(tmp_path, standin_eval):
    """checkpoint.keep=1 and a checkpoint every step, with evals slower than the steps: without the
    follower's hold, orbax would delete most steps before their eval (the stand-in fails on a
    missing checkpoint, and would be skipped)."""
    from lmjax.train.loop import train

    standin_eval(seconds=0.3)
    config = tiny_facts_config(**{"eval.async_tasks": "facts_recall", "train.steps": 8, "checkpoint.every": 1,
                                  "checkpoint.keep": 1})
    train(config, tmp_path)
    assert follow.wait(tmp_path, timeout=120) == {step: "done" for step in range(1, 9)}
    assert [row["step"] for row in eval_rows(tmp_path)] == list(range(1, 9))
    assert [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == [8]  # keep=1 once done


# --- config and cluster launchers -------------------------------------------------------------------

def test_async_tasks_must_name_eval_tasks():
    from lmjax.config import check_eval_task_names
    from lmjax.registry import ConfigError

    with pytest.raises(ConfigError, match="separated by commas"):
        tiny_facts_config(**{"eval.async_tasks": "facts_recall,,mqar"})
    pytest.importorskip("lmjax.eval.tasks")
    with pytest.raises(ConfigError, match=r"Unknown eval task\(s\) 'facts_recal' in eval.async_tasks; choose from: .*facts_recall"):
        check_eval_task_names("facts_recal", "eval.async_tasks")
    assert tiny_facts_config(**{"eval.async_tasks": "facts_recall"}).eval.async_tasks == "facts_recall"


def test_slurm_writes_an_eval_follower_array_beside_the_training_array(tmp_path):
    from test_grid import write_grid

    from lmjax.grid import load_grid, write_slurm
    from lmjax.grid.__main__ import main as grid_main

    path = write_grid(tmp_path, axes={"model.dim": [16, 32]}, fixed={"eval.async_tasks": "facts_recall"},
                      derive="lambda o: {'eval.async_tasks': '' if o['model.dim'] == 16 else 'facts_recall'}")
    grid = load_grid(path)
    assert [run.async_eval for run in grid.runs] == ["", "facts_recall"]
    assert grid_main([str(path), "--launcher", "slurm", "--slurm_time", "1:00:00", "--slurm_gpus", "1"]) == 0
    folder = tmp_path / "runs" / "slurm"
    train_script, eval_script = (folder / "array.sbatch").read_text(), (folder / "eval_array.sbatch").read_text()
    assert "export LMJAX_EVAL_FOLLOWER=external\n" in train_script
    for option in ("--job-name=lmjax-grid-eval", "--array=0-0%1", "--time=1:00:00", "--gpus=1", "--requeue"):
        assert f"#SBATCH {option}\n" in eval_script
    assert "--dependency" not in eval_script
    [line] = (folder / "eval_commands.txt").read_text().splitlines()
    argv = shlex.split(line)
    assert argv[1:] == ["-m", "lmjax.eval.follow", "--workdir", str(grid.runs[1].workdir), "--tasks", "facts_recall",
                        "--until", "finished", "--idle_timeout", "86400"]
    # the array task runs its follower: here a run that finished with nothing left to evaluate
    follow._write_json(grid.runs[1].workdir / "eval" / follow.TRAINER, {"pid": 1, "host": "elsewhere", "ended": 1.0, "finished": True})
    done = subprocess.run(["bash", str(folder / "eval_array.sbatch")], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SLURM_ARRAY_TASK_ID="0", PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    assert "0 evaluated, 0 skipped" in (grid.runs[1].workdir / "eval" / "follow.log").read_text()
    # without async eval the writer leaves no eval array behind
    write_slurm(grid, grid.runs[:1])
    assert not (folder / "eval_array.sbatch").exists() and "LMJAX_EVAL_FOLLOWER" not in (folder / "array.sbatch").read_text()


# --- end to end, with the real eval CLI ---------------------------------------------------------------

def _kill_first_eval_of(workdir, step, after_s, killed):
    """In a thread: SIGKILL the eval of `step` (its first attempt) `after_s` seconds after it starts."""
    deadline = time.time() + 300
    while time.time() < deadline:
        current = follow._read_json(follow.eval_dir(workdir) / follow.CURRENT)
        if current and current["step"] == step and current["attempt"] == 1:
            time.sleep(after_s)
            try:
                os.kill(current["pid"], signal.SIGKILL)
                killed.append(current["pid"])
            except ProcessLookupError:
                pass
            return
        time.sleep(0.01)


@pytest.mark.slow  # a training run and four eval processes (~1 min on 2 CPUs); the stand-in tests above run by default
def test_real_evals_of_every_checkpoint_land_in_the_metrics_and_a_killed_one_is_retried(tmp_path, monkeypatch):
    import threading

    from lmjax.train.loop import train

    monkeypatch.delenv(follow.COMMAND_ENV, raising=False)
    killed = []
    killer = threading.Thread(target=_kill_first_eval_of, args=(tmp_path, 8, 1.0, killed), daemon=True)
    killer.start()
    summary = train(tiny_facts_config(**{"eval.async_tasks": "facts_recall"}), tmp_path)
    assert summary["step"] == 12 and not summary["interrupted"]
    statuses = follow.wait(tmp_path, timeout=600)
    killer.join(timeout=1)
    log = (tmp_path / "eval" / "follow.log").read_text()
    assert statuses == {4: "done", 8: "done", 12: "done"}, log
    assert killed and "step 8: eval killed by SIGKILL" in log and "will retry" in log
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    results = {s: json.loads((tmp_path / "eval" / str(s) / "results.json").read_text()) for s in (4, 8, 12)}
    names = set(results[4]["metrics"])
    assert any(name.startswith("eval/") for name in names)
    landed = [row for row in rows if names <= set(row)]
    assert [row["step"] for row in landed] == [4, 8, 12]  # each with its checkpoint's step, in order
    for row in landed:
        assert results[row["step"]]["step"] == row["step"]
        assert {k: row[k] for k in names} == pytest.approx(results[row["step"]]["metrics"])
