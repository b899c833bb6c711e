"""What the training loop does between steps, each on its own period: `action(run, metrics)`
after every step, in order. An action fires on its period and, for those that must see the end,
on the last step (`train.steps`, a stop signal, or `train.stop_when` met).

Divergence. The step's `train/loss` and `train/grad_norm` are checked on the host where they are
read anyway: at every log step (after its row is written) and before every checkpoint. A
non-finite value raises `Diverged`, so nothing is saved after it and the last good checkpoints
are never rotated out (`checkpoint.keep`). A NaN or inf that appears between two log steps in a
parameter the batches use makes every later loss non-finite, so the next log step sees it. What
the metrics cannot see: they are computed before the step's own update, and an absurd learning
rate can overflow the new parameters or optimizer moments from finite gradients (weight decay
alone does it to rows no batch touches). So a save also checks the state it is about to write,
with one small jitted reduction beside the train step (whose arithmetic stays as it is).
"""
import math
import os
import re
import time

import jax
import jax.numpy as jnp

from lmjax.monitor.metrics import CannotWrite
from lmjax.run_dir import CHECKPOINTS
from lmjax.train.run import seconds_since_process_start

WATCHED = ("train/loss", "train/grad_norm")  # finite as long as training is sound


class Diverged(Exception):
    """Training produced a non-finite loss, gradient norm or train state; the run stopped without
    saving it (lmjax.main: exit status 3)."""

    def __init__(self, what: str, step: int, last_good: int | None):
        self.what, self.step, self.last_good = what, step, last_good
        kept = f"the last good one is step {last_good}" if last_good is not None else "none was saved before it"
        super().__init__(
            f"{what} at step {step}; stopped without saving a checkpoint ({kept}). Lower optim.lr, lengthen "
            f"optim.warmup_steps or set optim.clip_norm, and train in a new --workdir."
        )


def non_finite(values: dict) -> str | None:
    """'train/loss is nan' for the first watched metric in `values` (host floats) that is not
    finite; None when all are."""
    for name in WATCHED:
        if name in values and not math.isfinite(float(values[name])):
            return f"{name} is {float(values[name])}"
    return None


def stop_if_diverged(run, values: dict):
    what = non_finite(values)
    if what:
        raise Diverged(what, run.step, run.checkpointer.latest_step())


def write_failure(error: BaseException) -> OSError | None:
    """The OSError behind a failed checkpoint write, or None when `error` is something else:
    orbax writes through tensorstore, which reports the disk's error as a ValueError ending in
    `[os_error_code='28']`."""
    if isinstance(error, OSError):
        return error
    code = re.search(r"os_error_code='?(\d+)", str(error)) if isinstance(error, ValueError) else None
    return OSError(int(code[1]), os.strerror(int(code[1]))) if code else None


def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class LogMetrics:
    """Every `every` steps and at the last: the step's metrics (probe/... only on probe steps),
    throughput and MFU over the window since the last log."""

    def __init__(self, every, steps, probes_every):
        self.every, self.steps, self.probes_every = every, steps, probes_every
        self.last = {}

    def __call__(self, run, metrics):
        step = run.step
        if step % self.every and step != self.steps:
            return
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (self.probes_every and step % self.probes_every == 0):
            metrics = {k: v for k, v in metrics.items() if not k.startswith("probe/")}
        window = run.window
        elapsed = time.perf_counter() - window.start
        metrics["train/tokens_per_s"] = window.tokens / elapsed
        metrics["train/step_time_s"] = elapsed / window.steps
        if run.flops_per_step is not None:
            metrics["perf/flops_per_s"] = run.flops_per_step * window.steps / elapsed
            if run.flops_limit:
                metrics["perf/mfu"] = metrics["perf/flops_per_s"] / run.flops_limit
        metrics.update(run.profiler.window_metrics(elapsed, window.steps))
        self.last = metrics
        run.writer.write(step, metrics)
        run.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)
        stop_if_diverged(run, metrics)  # the row is written first: it shows what went wrong


class Evaluate:
    """Every `every` steps and at the last: the task's periodic evaluators; notes the step at
    which `stop_when` = (metric, op, threshold) is first met."""

    def __init__(self, every, steps, stop_when):
        self.every, self.steps, self.stop_when = every, steps, stop_when
        self.last, self.reached = {}, None

    def __call__(self, run, metrics):
        step = run.step
        if step % self.every and step != self.steps:
            return
        self.last = run.evaluate(at_end=False)
        self.last["time/since_start_s"] = seconds_since_process_start()
        run.writer.write(step, self.last)
        if self.stop_when and self.stop_when[0] in self.last:
            name, op, threshold = self.stop_when
            value = self.last[name]
            if value >= threshold if op == ">=" else value <= threshold:
                self.reached = step
        shown = {k.split("/")[-1]: f"{v:.3f}" for k, v in self.last.items() if "acc" in k or k == "eval/loss"}
        run.bar.set_postfix(shown, refresh=False)


class SaveCheckpoint:
    """Every `every` steps, and at the last step (waiting for the write to finish); `stopping()`:
    whether the loop ends after this step for another reason (signal, stop_when). Only a finite
    state is saved: the step's watched metrics, then the state itself, are checked first."""

    def __init__(self, every, steps, stopping):
        self.every, self.steps, self.stopping = every, steps, stopping
        self._finite = None  # the jitted check of the state, compiled at the first save

    def __call__(self, run, metrics):
        step = run.step
        last = step == self.steps or self.stopping()
        if step % self.every == 0 or last:
            stop_if_diverged(run, jax.device_get({k: metrics[k] for k in WATCHED if k in metrics}))
            if self._finite is None:
                self._finite = run.layout.jit(_all_finite, out_shardings=run.layout.replicated)
            if not bool(self._finite((run.state.params, run.state.opt_state))):
                raise Diverged("the parameters or optimizer moments hold nan/inf", step, run.checkpointer.latest_step())
            try:
                run.checkpointer.save(step, run.state, run.batches.get_state(), wait=last)
            except (OSError, ValueError) as error:
                if write_failure(error) is None:
                    raise
                folder = run.workdir / CHECKPOINTS  # an asynchronous save fails at the next one
                raise CannotWrite(folder if run.config.checkpoint.async_save else folder / str(step), write_failure(error)) from error


class RestartWindow:
    """After a log step's other actions: the next window times training steps only."""

    def __init__(self, every):
        self.every = every

    def __call__(self, run, metrics):
        if run.step % self.every == 0:
            run.window.restart()

