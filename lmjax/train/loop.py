"""The training loop: build the run, then step it, with periodic actions between steps.

Rerunning on the same workdir resumes from the latest checkpoint, bit-identically on CPU: the
checkpoint holds params, optimizer state, step, PRNG key and the data iterator's position.
SIGTERM (and Ctrl-C) saves a checkpoint at the current step before exiting.
"""
import json
import signal

import jax

from lmjax.config import parse_stop_when
from lmjax.train.actions import Evaluate, LogMetrics, RestartWindow, SaveCheckpoint
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


def train(config, workdir) -> dict:
    """Run (or resume) training in `workdir` from a checked config (lmjax.config.parse_config);
    returns the summary also written to summary.json."""
    run = build_run(config, workdir)
    t = config.train
    stop = StopSignal()
    log = LogMetrics(t.log_every, t.steps, config.logging.probes_every)
    evaluate = Evaluate(t.eval_every, t.steps, parse_stop_when(t.stop_when))
    stopping = lambda: stop.received is not None or evaluate.reached is not None  # noqa: E731
    actions = [log, evaluate, SaveCheckpoint(config.checkpoint.every, t.steps, stopping), RestartWindow(t.log_every)]
    try:
        while run.step < t.steps and not stopping():
            metrics = run.advance()
            for action in actions:
                action(run, metrics)
    finally:
        run.close()
        stop.restore()
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
    if jax.process_index() == 0:
        (run.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
