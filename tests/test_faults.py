"""What happens when things go wrong: a run that diverges stops at once without saving its NaNs,
and a workdir that cannot be written (a path below a file, a full disk under metrics.jsonl or
a checkpoint) or a metrics.jsonl cut short by a crash ends in one line, never a traceback."""
import errno
import json
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lmjax.train.run as run_module
from conftest import ROOT, cli, tiny_facts_config, tiny_facts_overrides
from lmjax.config import Logging
from lmjax.monitor.metrics import CannotWrite, MetricsFileError, MetricWriter
from lmjax.train.actions import Diverged
from lmjax.train.loop import train

FACTS = ROOT / "configs" / "facts.py"


def run_main(workdir, env, prefix=(), **overrides):
    args = [f"--config={FACTS}", *(f"--config.{k}={v}" for k, v in tiny_facts_overrides(**overrides).items())]
    return subprocess.run([*prefix, *cli(*args, f"--workdir={workdir}")], env=env, capture_output=True, text=True, timeout=600)


def error_line(result, status):
    """The one line on stderr of a run that failed with `status` (no traceback, nothing else)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("lmjax: error: "), lines[0]
    return lines[0]


def saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def saved_state_is_finite(workdir, step):
    tree = ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "state").absolute())
    return all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if np.issubdtype(np.asarray(x).dtype, np.inexact))


def rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# -- divergence ------------------------------------------------------------------------------------

def test_a_diverging_run_stops_in_one_line_and_keeps_its_good_checkpoints(tmp_path, subprocess_env):
    """A real divergence (optim.lr=100: the gradient norm turns NaN around step 8), through the
    command line: exit status 3, one line naming the step and the metric, nothing saved from that
    step on, so `checkpoint.keep=2` still holds the last good checkpoints, and they are finite.
    Before: the run trained on to step 40, logging "nan", and kept only NaN checkpoints."""
    result = run_main(tmp_path, subprocess_env, **{
        "optim.lr": 100.0, "train.steps": 40, "train.eval_every": 40, "checkpoint.every": 3, "checkpoint.keep": 2,
    })
    line = error_line(result, 3)
    match = re.fullmatch(
        r"lmjax: error: (train/loss|train/grad_norm) is (nan|inf) at step (\d+); stopped without saving a checkpoint "
        r"\(the last good one is step (\d+)\)\. Lower optim\.lr, .*", line)
    assert match, line
    name, value, step, last_good = match[1], match[2], int(match[3]), int(match[4])
    assert step % 2 == 0 or step % 3 == 0  # a log step (every 2) or a save step (every 3)
    assert saved_steps(tmp_path) == [s for s in range(3, step, 3)][-2:] and saved_steps(tmp_path)[-1] == last_good
    assert all(saved_state_is_finite(tmp_path, s) for s in saved_steps(tmp_path))
    logged = [r for r in rows(tmp_path) if "train/loss" in r]
    if step % 2 == 0:  # stopped by the log: its row is written, and shows what went wrong
        assert logged[-1]["step"] == step and logged[-1][name] == value
        logged = logged[:-1]
    assert all(np.isfinite([r["train/loss"], r["train/grad_norm"]]).all() for r in logged)
    assert not (tmp_path / "summary.json").exists()


def poison_after(monkeypatch, step, poison):
    """Make the run's train step replace its new parameters by `poison(params)` after `step`:
    the metrics of that step (computed before the update) stay finite."""
    real = run_module.make_train_step

    def make(*args, **kwargs):
        train_step = real(*args, **kwargs)

        def poisoned(state, batch):
            state, metrics = train_step(state, batch)
            if int(state.step) == step:
                state = state.replace(params=poison(state.params))
            return state, metrics

        poisoned.jitted = train_step.jitted
        return poisoned

    monkeypatch.setattr(run_module, "make_train_step", make)


def all_nan(params):
    return jax.tree_util.tree_map(lambda p: p * jnp.nan, params)


def one_inf(params):
    leaves, tree = jax.tree_util.tree_flatten(params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.inf)
    return jax.tree_util.tree_unflatten(tree, leaves)


def test_nan_between_two_log_steps_stops_the_run_at_the_next_one(tmp_path, monkeypatch):
    """NaN parameters after step 5 (no log or save there): step 6's loss is NaN, the log at
    step 6 stops the run; checkpoint 4 stays, checkpoint 8 is never written."""
    poison_after(monkeypatch, 5, all_nan)
    with pytest.raises(Diverged, match=r"^train/loss is nan at step 6; .*\(the last good one is step 4\)"):
        train(tiny_facts_config(), tmp_path)
    assert saved_steps(tmp_path) == [4]
    assert rows(tmp_path)[-1]["step"] == 6 and rows(tmp_path)[-1]["train/loss"] == "nan"


def test_a_state_that_overflows_in_its_own_update_is_not_saved(tmp_path, monkeypatch):
    """Finite loss and gradient norm at step 4, but its update left an inf in the parameters (as
    an absurd learning rate can): the save at step 4 checks the state and refuses it."""
    poison_after(monkeypatch, 4, one_inf)
    with pytest.raises(Diverged, match=r"^the parameters or optimizer moments hold nan/inf at step 4; .*"
                                       r"\(none was saved before it\)"):
        train(tiny_facts_config(), tmp_path)
    assert saved_steps(tmp_path) == []
    assert np.isfinite(rows(tmp_path)[-1]["train/loss"]) and rows(tmp_path)[-1]["step"] == 4


# -- files and disks -------------------------------------------------------------------------------

def test_a_workdir_below_a_file_is_one_line(tmp_path, subprocess_env):
    (tmp_path / "file").write_text("not a folder")
    workdir = tmp_path / "file" / "run"
    line = error_line(run_main(workdir, subprocess_env), 4)
    assert line == f"lmjax: error: cannot write {workdir}: Not a directory"


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_under_metrics_jsonl_is_one_line(tmp_path, subprocess_env):
    """metrics.jsonl on /dev/full, where every write fails with ENOSPC (the kernel's full disk)."""
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    line = error_line(run_main(tmp_path, subprocess_env), 4)
    assert line == f"lmjax: error: cannot write {tmp_path / 'metrics.jsonl'}: No space left on device"


def files_of_at_most(kib):
    """A command prefix: any write that would make a file longer than `kib` KiB fails with EFBIG,
    "File too large" (bash's `ulimit -f`, SIGXFSZ ignored), the way a full disk refuses it, down to
    the C++ writers of orbax's tensorstore."""
    return ["bash", "-c", f"ulimit -f {kib} && trap '' XFSZ && exec \"$@\"", "bash"]


# The async save (the recipes' default) in the default run; the synchronous one (15 s) in the slow run.
@pytest.mark.parametrize("async_save", [pytest.param(False, marks=pytest.mark.slow), pytest.param(True, marks=pytest.mark.slow)])
def test_a_checkpoint_the_disk_cannot_hold_is_one_line(tmp_path, subprocess_env, async_save):
    """The tiny run's state is ~175 kB on disk, its other files under 64 kB: the first save fails
    inside tensorstore, which reports it as a ValueError from orbax's threads (logged there with
    tracebacks, then late callbacks meeting orbax's closed event loop): one line, exit status 4."""
    # The compilation cache's entries outgrow the limit: off, also where an earlier in-process
    # entry point of this test worker already pointed jax at it.
    env = {**subprocess_env, "LMJAX_COMPILATION_CACHE": "off"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    result = run_main(tmp_path, env, files_of_at_most(64), **{"checkpoint.async_save": async_save})
    where = tmp_path / "checkpoints" if async_save else tmp_path / "checkpoints" / "4"  # async: found at the next save
    assert error_line(result, 4) == f"lmjax: error: cannot write {where}: File too large"
    assert saved_steps(tmp_path) == [] and not (tmp_path / "summary.json").exists()
    assert max(r["step"] for r in rows(tmp_path)) >= 4


class FillsUp:
    """A file whose writes fail with ENOSPC once `room` lines have been written."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, text):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= 1
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_disk_that_fills_up_during_training_stops_the_run_with_what_it_saved(tmp_path, monkeypatch):
    """The disk fills after a few rows: the run stops with CannotWrite naming metrics.jsonl, its
    checkpoint at step 4 intact, the rows written before the disk filled readable."""
    real_init = MetricWriter.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._file = FillsUp(self._file, room=5)

    monkeypatch.setattr(MetricWriter, "__init__", init)
    with pytest.raises(CannotWrite) as failed:
        train(tiny_facts_config(), tmp_path)
    assert str(failed.value) == f"cannot write {tmp_path / 'metrics.jsonl'}: No space left on device"
    assert saved_steps(tmp_path) == [4] and saved_state_is_finite(tmp_path, 4)
    assert len(rows(tmp_path)) == 5


# -- a metrics.jsonl cut short by a crash ------------------------------------------------------------

def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
    whole = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (2, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(whole) + '\n{"step": 8, "train/lo')
    writer = MetricWriter(tmp_path, Logging(tensorboard=False), {}, resume_step=4)
    writer.write(5, {"train/loss": 0.5})
    writer.close()
    assert rows(tmp_path) == [{"step": 2, "train/loss": 0.5}, {"step": 4, "train/loss": 0.25}, {"step": 5, "train/loss": 0.5}]
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"lmjax: warning: dropped the last line of {tmp_path / 'metrics.jsonl'}, cut short by a crash")


def test_a_fresh_start_after_a_crash_drops_what_the_crashed_attempt_logged(tmp_path, capsys):
    """No checkpoint was saved: training starts over at step 0 and logs everything again, so the
    earlier attempt's rows (and its torn last line) go; nothing is glued onto the torn line."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "model/params": 10}) + '\n{"step": 2, "tr')
    writer = MetricWriter(tmp_path, Logging(tensorboard=False), {})
    writer.write(0, {"model/params": 10})
    writer.close()
    assert rows(tmp_path) == [{"step": 0, "model/params": 10}]
    assert "cut short by a crash" in capsys.readouterr().err


def test_an_unreadable_line_before_the_last_is_an_error(tmp_path):
    lines = [json.dumps({"step": 2}), '{"step": 4, "tr', json.dumps({"step": 6})]
    write_lines(tmp_path / "metrics.jsonl", lines)
    with pytest.raises(MetricsFileError, match=re.escape(f"{tmp_path / 'metrics.jsonl'}:2 is not a JSON object")):
        MetricWriter(tmp_path, Logging(tensorboard=False), {}, resume_step=4)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines  # left as it was


def test_resume_after_a_crash_mid_write(tmp_path, subprocess_env):
    """The command line, on a run that died after checkpoint 4 while writing a row: the resume
    warns in one line, drops the torn row (and the rows after step 4) and finishes with the rows
    of the uninterrupted run; a torn row before the last is one error line, exit status 2."""
    overrides = {"train.steps": 8, "train.eval_every": 8}
    assert run_main(tmp_path / "full", subprocess_env, **overrides).returncode == 0
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    shutil.rmtree(crashed / "checkpoints" / "8")
    (crashed / "summary.json").unlink()
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    before_8 = [line for line in lines if json.loads(line)["step"] < 8]
    (crashed / "metrics.jsonl").write_text("".join(line + "\n" for line in before_8) + lines[-1][:25])
    result = run_main(crashed, subprocess_env, **overrides)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert warning.startswith(f"lmjax: warning: dropped the last line of {crashed / 'metrics.jsonl'}, cut short by a crash")
    assert untimed_rows(crashed) == untimed_rows(tmp_path / "full")

    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    write_lines(crashed / "metrics.jsonl", lines[:2] + ['{"step": 3, "tr'] + lines[2:])
    line = error_line(run_main(crashed, subprocess_env, **{**overrides, "train.steps": 12}), 2)
    assert f"{crashed / 'metrics.jsonl'}:3 is not a JSON object" in line and "only the last line may be cut short" in line


TIMED = ("time/recall_s", "train/tokens_per_s", "train/step_time_s", "time/since_start_s", "perf/flops_limit",
         "perf/flops_per_s", "perf/mfu")


def untimed_rows(workdir):
    return [{k: v for k, v in r.items() if k not in TIMED} for r in rows(workdir)]
