"""What the training loop does between steps, each on its own period: `action(run, metrics)`
after every step, in order. An action fires on its period and, for those that must see the end,
on the last step (`train.steps`, a stop signal, or `train.stop_when` met)."""
import time

import jax

from lmjax.train.run import seconds_since_process_start


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
    whether the loop ends after this step for another reason (signal, stop_when)."""

    def __init__(self, every, steps, stopping):
        self.every, self.steps, self.stopping = every, steps, stopping

    def __call__(self, run, metrics):
        step = run.step
        last = step == self.steps or self.stopping()
        if step % self.every == 0 or last:
            run.checkpointer.save(step, run.state, run.batches.get_state(), wait=last)


class RestartWindow:
    """After a log step's other actions: the next window times training steps only."""

    def __init__(self, every):
        self.every = every

    def __call__(self, run, metrics):
        if run.step % self.every == 0:
            run.window.restart()

