"""Profilers chosen by `implementation.profiler`: none | trace | light.

    none   nothing (the default); steps are dispatched asynchronously.
    trace  a `jax.profiler` trace of steps [logging.profile_start, logging.profile_stop) written
           to WORKDIR/profile/ (open it with TensorBoard's profile plugin or Perfetto).
    light  a step-time breakdown logged with the training metrics: perf/data_wait_s (waiting for
           the input pipeline), perf/compute_s (dispatch until the step's results are ready),
           perf/host_s (the rest: logging, bookkeeping). It waits for every step to finish,
           which removes the overlap of host work with device work that `none` allows.

The loop calls, per step: `with profiler.data_wait(): batch = ...`, `profiler.before_step(step)`,
`profiler.after_step(step, outputs)`, and `profiler.window_metrics(elapsed, steps)` when it logs.
"""
import contextlib
import time
from pathlib import Path

import jax

from lmjax.registry import Registry

PROFILERS = Registry("implementation.profiler")


@PROFILERS.register("none")
class NoProfiler:
    def __init__(self, workdir=None, *, start=0, stop=0):
        pass

    def data_wait(self):
        return contextlib.nullcontext()

    def before_step(self, step: int):
        pass

    def after_step(self, step: int, outputs):
        pass

    def window_metrics(self, elapsed_s: float, steps: int) -> dict:
        return {}

    def close(self):
        pass


@PROFILERS.register("trace")
class TraceProfiler(NoProfiler):
    """Traces the steps numbered [start, stop) (step = the state's step before the update)."""

    def __init__(self, workdir, *, start, stop):
        self.start, self.stop = start, stop
        self.directory = Path(workdir) / "profile"
        self._active = False
        self._annotation = None

    def before_step(self, step):
        if step == self.start and jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self._active = True
        if self._active:
            self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
            self._annotation.__enter__()

    def after_step(self, step, outputs):
        if not self._active:
            return
        jax.block_until_ready(outputs)  # the trace must hold the whole step, not its dispatch
        self._annotation.__exit__(None, None, None)
        if step + 1 >= self.stop:
            self.close()

    def close(self):
        if self._active:
            jax.profiler.stop_trace()
            self._active = False


@PROFILERS.register("light")
class LightProfiler(NoProfiler):
    def __init__(self, workdir=None, *, start=0, stop=0):
        self._data = self._compute = 0.0
        self._dispatched = None

    @contextlib.contextmanager
    def data_wait(self):
        start = time.perf_counter()
        yield
        self._data += time.perf_counter() - start

    def before_step(self, step):
        self._dispatched = time.perf_counter()

    def after_step(self, step, outputs):
        jax.block_until_ready(outputs)
        self._compute += time.perf_counter() - self._dispatched

    def window_metrics(self, elapsed_s, steps):
        steps = max(steps, 1)
        data, compute = self._data / steps, self._compute / steps
        self._data = self._compute = 0.0
        return {
            "perf/data_wait_s": data, "perf/compute_s": compute,
            "perf/host_s": max(elapsed_s / steps - data - compute, 0.0),
        }


def make_profiler(name, workdir, *, start, stop):
    """`implementation.profiler` by name; `start`/`stop`: the steps a trace records."""
    return PROFILERS.get(name)(workdir, start=start, stop=stop)
