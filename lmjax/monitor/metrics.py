"""Metric sinks: WORKDIR/metrics.jsonl (always), tensorboardX events in WORKDIR/tb/, wandb."""
import json
import math
import uuid
from pathlib import Path


def _tensorboardx_writer_class():
    """tensorboardX imports torch when it is installed (~1.5 s of start-up here) only to name
    torch.Tensor in type hints; lmjax logs floats, so torch is hidden during that import unless
    something has loaded it already."""
    import sys

    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX allows
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


def _plain(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricWriter:
    """Writes `{"step": s, name: value, ...}` lines; only the lead process writes (`enabled`)."""

    def __init__(self, workdir, logging, run_config: dict, *, enabled: bool = True, resume_step: int | None = None):
        """`logging`: the config's logging section; `run_config`: the whole config as a dict, for wandb."""
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path = self.workdir / "metrics.jsonl"
        if resume_step is not None:
            self._drop_lines_after(resume_step)
        self._file = open(self.path, "a")
        if logging.tensorboard:
            self._tb = _tensorboardx_writer_class()(str(self.workdir / "tb"))
        if logging.wandb.mode != "disabled":
            self._wandb = WandbRun(self.workdir, logging.wandb, run_config)

    def _drop_lines_after(self, step):
        """On resume, lines logged after the checkpoint will be logged again: drop them."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict):
        if not self.enabled or not metrics:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, float(value), int(step))
        if self._wandb is not None:
            self._wandb.log(int(step), metrics)

    def close(self):
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def wandb_run_id(workdir) -> tuple[str, bool]:
    """(run id, whether it is new): a workdir keeps one wandb run id in WORKDIR/wandb_id."""
    id_file = Path(workdir) / "wandb_id"
    if id_file.exists():
        return id_file.read_text().strip(), False
    run_id = uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return run_id, True


class WandbRun:
    """The workdir's wandb run, continued by every resume of the workdir.

    Resuming from checkpoint step S logs steps S+1... again, but the interrupted process may
    already have sent some of them, and wandb keeps a run's steps increasing: a step below the
    last one is dropped with a warning. So steps up to the last one sent (kept in
    WORKDIR/wandb_step) are not sent again; wandb keeps the interrupted process's values for
    them (the same numbers, since resume is bit-identical, except the timings). metrics.jsonl
    stays the record of the resumed run, and `python -m lmjax.monitor.sync WORKDIR` replays it
    into the same wandb run when the two must match exactly.

    Why not wandb's rewind (`wandb.init(resume_from=f"{id}?_step={S}")`, beta in wandb 0.31)?
    It truncates the run on the server (the RewindRun mutation), so it works online only and
    only once the run exists there. Offline it is just recorded in the run's config, and
    `wandb sync` of several offline folders with one id keeps one folder's history, not their
    union (wandb issues #3841, #5865). Skipping behaves the same online and offline.
    """

    def __init__(self, workdir, wandb_section, run_config: dict):
        self._step_file = Path(workdir) / "wandb_step"
        run_id, new = wandb_run_id(workdir)
        self.sent_through = -1 if new or not self._step_file.exists() else int(self._step_file.read_text())
        self.run = _start_wandb(workdir, wandb_section, run_config, run_id)
        if self.run.resumed:  # online: the server says where the run stopped
            self.sent_through = max(self.sent_through, self.run.starting_step - 1)
        self._skip_through = self.sent_through  # steps of this process may repeat (train + eval at one step)

    def log(self, step: int, metrics: dict):
        if step <= self._skip_through:
            return
        self.run.log(metrics, step=step)
        if step > self.sent_through:
            self.sent_through = step
            self._step_file.write_text(str(step))

    def finish(self):
        self.run.finish()


def _start_wandb(workdir, w, run_config, run_id):
    """Resuming a workdir continues the same wandb run (its id is kept in WORKDIR/wandb_id)."""
    import wandb

    return wandb.init(
        project=w.project, entity=w.entity or None, name=w.name or Path(workdir).name, mode=w.mode,
        dir=str(workdir), config=run_config, id=run_id, resume="allow",
    )
