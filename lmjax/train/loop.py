"""The training loop: build the run, then step it, with periodic actions between steps.

Rerunning on the same workdir resumes from the newest intact checkpoint, bit-identically on CPU: the
checkpoint holds params, optimizer state, step, PRNG key and the data iterator's position.
SIGTERM (and Ctrl-C) saves a checkpoint at the current step before exiting.

What stops a run early, besides a signal and `train.stop_when`, is an error raised out of
`train`, after the run is closed (a save in flight finishes, what was logged is written):
`Diverged` (lmjax.train.actions: a non-finite loss, gradient norm or state; nothing saved after
it) and `CannotWrite` (lmjax.monitor.metrics: the workdir, metrics.jsonl, the tensorboard events,
a checkpoint or summary.json could not be written). A diverged or failed run writes no summary.json.
"""
import json
import signal
import tempfile
from pathlib import Path

import jax

from lmjax.config import parse_stop_when
from lmjax.monitor.metrics import CannotWrite
from lmjax.run_dir import CHECKPOINTS
from lmjax.train.actions import Evaluate, LogMetrics, RestartWindow, SaveCheckpoint, write_failure
from lmjax.train.run import build_run, seconds_since_process_start


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.received = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_workdir(workdir) -> Path:
    """The run folder, created and shown to be writable before anything is built; CannotWrite
    (one line) otherwise: a path below a file, a read-only disk, no permission."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as error:
        raise CannotWrite(workdir, error) from error
    return workdir


def _close_checkpoints(run):
    """Close the run (its last save finishes here when asynchronous)."""
    try:
        run.close()
    except (OSError, ValueError) as error:
        if write_failure(error) is None:
            raise
        raise CannotWrite(run.workdir / CHECKPOINTS, write_failure(error)) from error


def _close_quietly(*closes):
    """After an error: close what is still open, keeping that error (a second one while closing,
    the same full disk again, is dropped)."""
    for close in closes:
        try:
            close()
        except Exception:  # noqa: BLE001 - the error being raised says what went wrong
            pass


def _async_evals(run):
    """eval.async_tasks on process 0: the follower that evaluates every saved checkpoint in a process
    of its own (lmjax.eval.follow); None otherwise. Training never waits for it."""
    tasks = run.config.eval.async_tasks
    if not tasks or not run.is_lead:
        return None
    from lmjax.eval.follow import TrainerSide

    # A TPU is held by one process: the evals beside a TPU trainer run on the host's CPU.
    return TrainerSide(run.workdir, tasks, run.resumed_from, platforms="cpu" if jax.default_backend() == "tpu" else "")


def train(config, workdir) -> dict:
    """Run (or resume) training in `workdir` from a checked config (lmjax.config.parse_config);
    returns the summary also written to summary.json. Raises `Diverged` or `CannotWrite` (see
    above) after closing the run."""
    run = build_run(config, make_workdir(workdir))
    t = config.train
    stop = StopSignal()
    log = LogMetrics(t.log_every, t.steps, config.logging.probes_every)
    evaluate = Evaluate(t.eval_every, t.steps, parse_stop_when(t.stop_when))
    stopping = lambda: stop.received is not None or evaluate.reached is not None  # noqa: E731
    actions = [log, evaluate, SaveCheckpoint(config.checkpoint.every, t.steps, stopping), RestartWindow(t.log_every)]
    try:
        async_evals = _async_evals(run)
    except BaseException:
        _close_quietly(run.close, run.writer.close)
        stop.restore()
        raise
    if async_evals is not None:
        actions.append(lambda run, metrics: async_evals.check())  # a follower that died is started again
    finished = False
    try:
        summary = _train(run, config, stop, log, evaluate, stopping, actions)
        finished = not summary["interrupted"]
        return summary
    finally:
        if async_evals is not None:  # the follower evaluates what is left, then exits
            async_evals.ended(finished)


def _train(run, config, stop, log, evaluate, stopping, actions) -> dict:
    t = config.train
    try:
        while run.step < t.steps and not stopping():
            metrics = run.advance()
            for action in actions:
                action(run, metrics)
    except BaseException:
        _close_quietly(run.close, run.writer.close)
        raise
    finally:
        stop.restore()
    try:
        _close_checkpoints(run)
        if stop.received is None:
            final = run.evaluate(at_end=True)
            if final:
                final["time/since_start_s"] = seconds_since_process_start()
                run.writer.write(run.step, final)
                evaluate.last = {**evaluate.last, **final}
        summary = {
            "step": run.step, "interrupted": stop.received is not None, "stopped_early": evaluate.reached is not None,
            "params": run.n_params, "seconds_since_start": round(seconds_since_process_start(), 2),
            **log.last, **evaluate.last,
        }
        run.writer.close()
    except BaseException:
        _close_quietly(run.writer.close)
        raise
    if jax.process_index() == 0:
        path = run.workdir / "summary.json"
        try:
            path.write_text(json.dumps(summary, indent=2))
        except OSError as error:
            raise CannotWrite(path, error) from error
    return summary
