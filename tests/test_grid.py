"""lmjax.grid: expansion, commands that absl parses back, the local runner (resume, failures, Ctrl-C),
the SLURM and multi-host script writers, and the progress table.

Real training: three tiny facts runs in all (two in the module fixture, one resumed); every other
runner test swaps the run commands for `python -c` stand-ins.
"""
import dataclasses
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import ROOT, tiny_facts_overrides
from lmjax.config import load_config_file
from lmjax.grid import GridError, load_grid, run_local, run_status, write_multihost, write_slurm
from lmjax.grid.__main__ import main as grid_main
from lmjax.grid.local import failure_lines
from lmjax.grid.table import format_table, latest_metrics, run_row
from lmjax.registry import ConfigError

FACTS = ROOT / "configs" / "facts.py"


def write_grid(folder, *, derive=None, where=None, **spec):
    """A grid file in `folder` returning `spec` (+ `derive`/`where` given as source text); its path."""
    spec.setdefault("config", str(FACTS))
    spec.setdefault("root", str(folder / "runs"))
    lines = ["def get_grid():", f"    spec = {spec!r}"]
    for key, source in (("derive", derive), ("where", where)):
        if source:
            lines.append(f"    spec[{key!r}] = {source}")
    lines.append("    return spec")
    path = folder / "grid.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def with_commands(grid, commands):
    """The grid with run i's command replaced by commands[i] (stand-ins for lmjax.main)."""
    runs = [dataclasses.replace(run, command=command) for run, command in zip(grid.runs, commands)]
    return dataclasses.replace(grid, runs=runs)


def python(code, *args):
    return [sys.executable, "-c", code, *map(str, args)]


def write_done_summary(workdir, step=6):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "summary.json").write_text(json.dumps({"step": step, "interrupted": False}))


# --- expansion -------------------------------------------------------------------------------


def test_expansion_applies_fixed_then_axes_then_seed_then_derive_and_filters(tmp_path):
    path = write_grid(
        tmp_path,
        fixed={"train.steps": 20, "data.mode": "weights"},
        axes={
            "data.num_people": [8, 16],
            "model.dim": [16, 32],
            "mode": {"weights": {"data.mode": "weights"}, "tool": {"data.mode": "tool", "train.steps": 30}},
        },
        seeds=[0, 1],
        derive="lambda o: {'model.mlp_hidden': 4 * o['model.dim'], 'optim.lr': o['optim.lr'] / 2}",
        where="lambda labels: not (labels['mode'] == 'tool' and labels['model.dim'] == 32)",
    )
    grid = load_grid(path)
    assert len(grid.runs) == 2 * 2 * 2 * 2 - 2 * 2  # minus (tool, dim 32) x 2 sizes x 2 seeds
    run = next(r for r in grid.runs if r.name == "num_people=16,dim=16,mode=tool,seed=1")
    assert run.labels == {"data.num_people": 16, "model.dim": 16, "mode": "tool", "seed": 1}
    assert run.overrides == {
        "train.steps": 30,  # the bundle overrides the fixed value
        "data.mode": "tool",
        "data.num_people": 16, "model.dim": 16, "seed": 1,
        "model.mlp_hidden": 64,
        "optim.lr": 0.0005,  # derive reads keys the grid does not set from the base config (1e-3)
    }
    assert run.steps == 30 and run.workdir == tmp_path / "runs" / run.name
    assert run.command[:4] == [sys.executable, "-m", "lmjax.main", f"--config={FACTS}"]
    assert run.command[-1] == f"--workdir={run.workdir}"
    names = [r.name for r in grid.runs]
    assert len(set(names)) == len(names)
    assert names == [r.name for r in load_grid(path).runs]  # deterministic
    assert names[0] == "num_people=8,dim=16,mode=weights,seed=0"  # axes in order, then the seed


def test_without_seeds_one_run_per_combination_labelled_with_the_base_seed(tmp_path):
    grid = load_grid(write_grid(tmp_path, axes={"model.dim": [16]}), root=tmp_path / "elsewhere")
    assert [(r.name, r.overrides) for r in grid.runs] == [("dim=16,seed=0", {"model.dim": 16})]
    assert grid.root == tmp_path / "elsewhere"


def test_ambiguous_short_keys_keep_the_full_key_and_values_are_made_filesystem_safe(tmp_path):
    grid = load_grid(write_grid(tmp_path, axes={"data.seed": [1], "seed": [2], "data.cache_dir": ["a b/c", ""]}))
    assert [r.name for r in grid.runs] == ["data.seed=1,seed=2,cache_dir=a_b_c", "data.seed=1,seed=2,cache_dir=empty"]


@pytest.mark.parametrize("overrides, message", [
    ({"data.num_peple": 8}, "num_peple"),
    ({"modle.dim": 8}, "modle"),
    ({"model.dim": "wide"}, "model.dim='wide' is a str but the config holds a int"),
    ({"model.dim": 33}, "model.dim=33 must split"),  # lmjax.config.validate
])
def test_a_bad_override_is_a_config_error_naming_the_run_and_the_key(tmp_path, overrides, message):
    path = write_grid(tmp_path, fixed=overrides, axes={"train.steps": [5]})
    with pytest.raises(ConfigError, match="run 'steps=5,seed=0'") as error:
        load_grid(path)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("spec, message", [
    (dict(config=None), "has no 'config'"),
    (dict(config="configs/nope.py"), "not found"),
    (dict(axes={"model.dim": []}), "axis 'model.dim' is empty"),
    (dict(axes={"data.cache_dir": ["x/y", "x_y"]}), "both get the folder name 'cache_dir=x_y,seed=0'"),
    (dict(axis={"model.dim": [16]}), "unknown grid key(s) axis"),
    (dict(seeds=[]), "'seeds' must be a non-empty list"),
    (dict(where="lambda labels: False"), "no runs"),
    (dict(derive="lambda o: {'model.x': o['model.nope']}"), "'derive' failed"),
])
def test_grid_file_mistakes_are_one_line_errors(tmp_path, capsys, spec, message):
    spec = dict(spec)
    for key in ("derive", "where"):
        spec[key] = spec.get(key)
    if spec.get("config", "") is None:
        path = tmp_path / "grid.py"
        path.write_text("def get_grid():\n    return {'axes': {'model.dim': [16]}}\n")
    else:
        path = write_grid(tmp_path, **spec)
    with pytest.raises(GridError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_grid(path)
    assert grid_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmjax.grid: error: ") and err.count("\n") == 1 and "Traceback" not in err


# --- commands --------------------------------------------------------------------------------


def test_command_overrides_read_back_by_absl_config_flags_with_their_types(tmp_path):
    overrides = {
        "model.dim": 48, "optim.lr": 3e-4, "optim.weight_decay": 1,  # an int given for a float key
        "logging.progress_bar": False, "model.tie_embeddings": True,
        "data.mode": "tool", "train.stop_when": "", "data.cache_dir": "/tmp/with space,comma",
    }
    run = load_grid(write_grid(tmp_path, fixed=overrides)).runs[0]
    assert "--config.train.stop_when=" in run.command and "--config.logging.progress_bar=False" in run.command
    argv = ["lmjax.main", *run.command[3:]]
    values = flags.FlagValues()  # as lmjax.main defines its flags, on a fresh registry
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(argv)
    expected = load_config_file(FACTS, overrides.items())
    for key in overrides:
        parsed, want = values.config, expected
        for part in key.split("."):
            parsed, want = parsed[part], want[part]
        assert (parsed, type(parsed)) == (want, type(want)), key
    assert values.workdir == str(run.workdir)
    assert shlex.split(shlex.join(run.command)) == run.command


# --- the local runner ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny facts runs (6 steps, checkpoints every 2), run side by side: (grid, report, table output)."""
    folder = tmp_path_factory.mktemp("grid")
    fixed = tiny_facts_overrides(**{"train.steps": 6, "checkpoint.every": 2, "train.eval_every": 3})
    grid = load_grid(write_grid(folder, name="tiny", fixed=fixed, seeds=[0, 1]))
    out = io.StringIO()
    report = run_local(grid, parallel=2, out=out)
    return grid, report, out.getvalue()


def test_local_runs_finish_and_leave_their_records(trained):
    grid, report, output = trained
    names = [run.name for run in grid.runs]
    assert names == ["seed=0", "seed=1"]
    assert report.launched == names and report.exit_codes == {name: 0 for name in names}, output
    assert report.statuses == {name: "done" for name in names} and not report.failed and not report.interrupted
    for run in grid.runs:
        assert json.loads((run.workdir / "summary.json").read_text())["step"] == 6
        record = json.loads((run.workdir / "grid.json").read_text())
        assert record == {"grid": "tiny", "labels": run.labels, "overrides": run.overrides,
                          "command": run.command, "config": str(FACTS)}
        assert (run.workdir / "grid_run.log").read_text().startswith("=== lmjax.grid ")
        assert run_status(run) == "done"
    assert "grid tiny: 2 done, 0 running, 0 pending, 0 failed" in output
    final_table = output[output.rindex("grid tiny:"):]
    assert "6/6" in final_table and "qa_acc" in final_table


def test_rerunning_a_finished_grid_launches_nothing(trained):
    grid, _, _ = trained
    report = run_local(grid, parallel=2, out=io.StringIO())
    assert report.launched == [] and report.statuses == {"seed=0": "done", "seed=1": "done"}


def test_an_interrupted_run_resumes_from_its_checkpoint(trained):
    grid, _, _ = trained
    run = grid.runs[0]
    metrics_before = (run.workdir / "metrics.jsonl").read_text().splitlines()
    (run.workdir / "summary.json").unlink()  # as if stopped after the checkpoint at step 4
    shutil.rmtree(run.workdir / "checkpoints" / "6")
    assert run_status(run) == "interrupted"
    report = run_local(grid, parallel=2, out=io.StringIO())
    assert report.launched == [run.name] and report.statuses[run.name] == "done"
    assert json.loads((run.workdir / "summary.json").read_text())["step"] == 6
    rows = [json.loads(line) for line in (run.workdir / "metrics.jsonl").read_text().splitlines()]
    # resumed, not restarted: the lines up to step 4 are kept once, and steps 5-6 are logged again
    kept = [line for line in metrics_before if json.loads(line)["step"] <= 4]
    assert (run.workdir / "metrics.jsonl").read_text().splitlines()[:len(kept)] == kept
    assert sum("model/params" in row for row in rows) == 1 and rows[-1]["step"] == 6
    assert (run.workdir / "grid_run.log").read_text().count("=== lmjax.grid ") == 2


def test_a_failed_run_is_recorded_and_the_others_still_run(tmp_path):
    grid = load_grid(write_grid(tmp_path, seeds=[0, 1, 2]))
    fail = python("import sys; print('boom: bad things', file=sys.stderr); sys.exit(3)")
    finish = python("import json, sys; open(sys.argv[1], 'w').write(json.dumps({'step': 6, 'interrupted': False}))",
                    grid.runs[1].workdir / "summary.json")
    silent = python("pass")  # exits 0 without a summary: a failure too
    grid = with_commands(grid, [fail, finish, silent])
    report = run_local(grid, parallel=1, out=io.StringIO())
    assert report.launched == ["seed=0", "seed=1", "seed=2"]
    assert report.statuses == {"seed=0": "failed", "seed=1": "done", "seed=2": "failed"}
    assert report.exit_codes == {"seed=0": 3, "seed=1": 0, "seed=2": 0}
    attempt = json.loads((grid.runs[0].workdir / "grid_status.json").read_text())
    assert attempt["status"] == "failed" and attempt["exit_code"] == 3 and "boom: bad things" in attempt["log_tail"]
    lines = failure_lines(grid.runs, report)
    assert len(lines) == 2 and "seed=0 (exit 3): boom: bad things" in lines[0] and "no finished summary" in lines[1]
    assert run_local(grid, out=io.StringIO()).launched == []  # failed runs wait for --retry_failed
    assert run_local(grid, out=io.StringIO(), retry_failed=True, only="seed=0").launched == ["seed=0"]


CHILD = """
import json, pathlib, signal, sys, time
workdir = pathlib.Path(sys.argv[1])
def stop(signum, frame):  # what lmjax.main does on SIGTERM: checkpoint, interrupted summary, exit 143
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "summary.json").write_text(json.dumps({"step": 3, "interrupted": True}))
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
(workdir / "ready").touch()
time.sleep(60)
"""


def test_ctrl_c_stops_the_children_with_sigterm_and_leaves_them_interrupted(tmp_path):
    grid = load_grid(write_grid(tmp_path, seeds=[0, 1, 2]))
    grid = with_commands(grid, [python(CHILD, run.workdir) for run in grid.runs])
    running_test = threading.Event()

    def interrupt_when_ready():
        deadline = time.time() + 30
        while time.time() < deadline and running_test.is_set():
            if all((run.workdir / "ready").exists() for run in grid.runs[:2]):
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
                return
            time.sleep(0.1)

    def swallow(signum, frame):  # an embedding process's own handler must not stop Ctrl-C reaching the grid
        pass

    embedding_handler = signal.signal(signal.SIGINT, swallow)
    running_test.set()
    thread = threading.Thread(target=interrupt_when_ready, daemon=True)
    thread.start()
    try:
        report = run_local(grid, parallel=2, out=io.StringIO())
        assert signal.getsignal(signal.SIGINT) is swallow  # given back afterwards
    finally:
        running_test.clear()
        thread.join()
        signal.signal(signal.SIGINT, embedding_handler)
    assert report.interrupted and report.launched == ["seed=0", "seed=1"]
    assert report.exit_codes == {"seed=0": 143, "seed=1": 143}
    assert report.statuses == {"seed=0": "interrupted", "seed=1": "interrupted", "seed=2": "pending"}
    assert report.seconds < 30
    assert json.loads((grid.runs[0].workdir / "grid_status.json").read_text())["status"] == "stopped"


def test_a_run_still_running_from_an_earlier_runner_is_not_launched_twice(tmp_path):
    grid = load_grid(write_grid(tmp_path, seeds=[0]))
    run = grid.runs[0]
    orphan = subprocess.Popen(python("import time; time.sleep(30)"))  # a child whose runner was killed
    try:
        run.workdir.mkdir(parents=True)
        (run.workdir / "grid_status.json").write_text(json.dumps({
            "status": "running", "host": socket.gethostname(), "pid": orphan.pid,
            "pid_created": psutil.Process(orphan.pid).create_time(), "started": time.time(),
        }))
        assert run_status(run) == "running"
        report = run_local(grid, out=io.StringIO())
        assert report.launched == [] and report.statuses == {run.name: "running"}
    finally:
        orphan.kill()
        orphan.wait()
    assert run_status(run) == "pending"


# --- cluster scripts -------------------------------------------------------------------------


def test_slurm_array_lists_the_runs_not_done_one_shell_command_a_line(tmp_path, capsys):
    path = write_grid(tmp_path, axes={"model.dim": [16, 32, 64]})
    grid = load_grid(path)
    write_done_summary(grid.runs[0].workdir)
    assert grid_main([str(path), "--launcher", "slurm", "--parallel", "2", "--slurm_time", "2:00:00",
                      "--slurm_gpus", "1", "--slurm_cpus", "4", "--slurm_partition", "gpu"]) == 0
    script = tmp_path / "runs" / "slurm" / "array.sbatch"
    assert f"sbatch {script}" in capsys.readouterr().out
    text = script.read_text()
    for option in ("--array=0-1%2", "--time=2:00:00", "--gpus=1", "--cpus-per-task=4", "--partition=gpu", "--requeue"):
        assert f"#SBATCH {option}\n" in text
    lines = (tmp_path / "runs" / "slurm" / "commands.txt").read_text().splitlines()
    assert [shlex.split(line) for line in lines] == [run.command for run in grid.runs[1:]]
    assert json.loads((grid.runs[1].workdir / "grid.json").read_text())["labels"] == {"model.dim": 32, "seed": 0}
    # the array task runs its line (stand-in commands)
    fake = with_commands(grid, [python("import sys; print('task', sys.argv[1])", run.name) for run in grid.runs])
    script = write_slurm(fake, fake.runs[1:], parallel=None)
    assert "#SBATCH --array=0-1%2\n" in script.read_text() and "--gpus" not in script.read_text()
    done = subprocess.run(["bash", str(script)], env=dict(os.environ, SLURM_ARRAY_TASK_ID="1"),
                          capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "task dim=64,seed=0"


def test_multihost_script_runs_each_run_on_every_host_with_the_jax_variables(tmp_path):
    grid = load_grid(write_grid(tmp_path, axes={"model.dim": [16, 32]}))
    show = "import os; print(os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'], os.environ['JAX_COORDINATOR_ADDRESS'])"
    grid = with_commands(grid, [python(show), python("import sys; sys.exit(5)")])
    script = write_multihost(grid, grid.runs, hosts=2)
    done = subprocess.run(["bash", str(script), "1", "10.0.0.1:1234"], capture_output=True, text=True)
    assert done.returncode == 1  # the second run failed
    assert "1 2 10.0.0.1:1234" in done.stdout and "failed (exit 5)" in done.stdout
    assert (grid.runs[0].workdir / "grid_run.process1.log").read_text() == "1 2 10.0.0.1:1234\n"
    write_done_summary(grid.runs[0].workdir)
    again = subprocess.run(["bash", str(script)], env=dict(os.environ, PROCESS_ID="0", COORDINATOR="h:1"),
                           capture_output=True, text=True)
    assert "done already" in again.stdout and "0 2 h:1" not in again.stdout


# --- the progress table ----------------------------------------------------------------------


def test_progress_table_reads_the_latest_metrics(tmp_path):
    grid = load_grid(write_grid(tmp_path, fixed={"train.steps": 10}, seeds=[0, 1]))
    run = grid.runs[0]
    run.workdir.mkdir(parents=True)
    rows = [{"step": 0, "model/params": 1000}, {"step": 2, "train/loss": 2.5},
            {"step": 4, "train/loss": 1.75, "eval/qa_unseen_acc": 0.25, "eval/qa_acc": 0.5}, {"step": 8, "train/loss": 1.25}]
    (run.workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "tra')
    assert latest_metrics(run.workdir) == {"step": 8, "train/loss": 1.25, "eval": ("eval/qa_acc", 0.5)}
    assert run_row(run, "running")[:5] == ["seed=0", "running", "8/10", "1.2500", "qa_acc 0.500"]
    (grid.runs[1].workdir).mkdir(parents=True)
    (grid.runs[1].workdir / "metrics.jsonl").write_text(json.dumps({"step": 3, "eval/loss": 0.125}) + "\n")
    assert run_row(grid.runs[1], "pending") == ["seed=1", "pending", "3/10", "-", "loss 0.125", "-"]
    table = format_table("g", grid.runs, {"seed=0": "running", "seed=1": "failed"}, 65.2).splitlines()
    assert table[0] == "grid g: 0 done, 1 running, 0 pending, 1 failed | 65 s"
    assert table[1].split() == ["run", "status", "step", "loss", "eval", "time"]
    assert len({len(line) for line in table[1:3]}) == 1  # aligned columns


def test_dry_run_prints_the_commands_and_starts_nothing(tmp_path, capsys):
    path = write_grid(tmp_path, fixed={"train.stop_when": ""}, seeds=[0, 1])
    assert grid_main([str(path), "--dry_run", "--only", "seed=1"]) == 0
    out = capsys.readouterr().out
    assert "would launch 1 of 1 runs" in out and "--config.train.stop_when= " in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("sizes", ["cpu", "cluster"])
def test_capacity_study_runs_meet_their_budgets_and_exposures(sizes, monkeypatch):
    """experiments/capacity/grid.py: every shape within 2% of its budget, heads dividing the width
    into even heads of 4 or more, and steps that show each biography EXPOSURES times."""
    from lmjax.models.budget import count_params

    monkeypatch.setenv("CAPACITY_SIZES", sizes)
    grid = load_grid(ROOT / "experiments" / "capacity" / "grid.py")
    exposures = 200 if sizes == "cpu" else 1000
    for run in grid.runs:
        o = run.overrides
        budget = int(run.labels["shape"].split("_")[0][1:-1]) * 1000
        params = count_params(dim=o["model.dim"], n_layers=o["model.n_layers"], n_heads=o["model.n_heads"],
                              mlp_hidden=o["model.mlp_hidden"], vocab_size=260).params
        assert abs(params - budget) <= 0.02 * budget, run.name
        head_dim = o["model.dim"] // o["model.n_heads"]
        assert head_dim * o["model.n_heads"] == o["model.dim"] and head_dim % 2 == 0 and head_dim >= 4
        assert o["data.mode"] == "bio" and o["train.batch_size"] == 4 and o["train.seq_len"] == 448
        assert run.steps == round(exposures * o["data.num_people"] / 11.96)
    shapes = {(r.overrides["model.n_layers"], r.overrides["model.n_heads"]) for r in grid.runs}
    assert {layers for layers, _ in shapes} >= {1, 2, 4, 8} and {heads for _, heads in shapes} >= {1, 2, 4}
