"""Metric sinks: WORKDIR/metrics.jsonl (always), tensorboardX events in WORKDIR/tb/, wandb."""
import json
import math
import uuid
from pathlib import Path


def _plain(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricWriter:
    """Writes `{"step": s, name: value, ...}` lines; only the lead process writes (`enabled`)."""

    def __init__(self, workdir, config, *, enabled: bool = True, resume_step: int | None = None):
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
        if config.logging.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tb"))
        if config.logging.wandb.mode != "disabled":
            self._wandb = _start_wandb(self.workdir, config)

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
            self._wandb.log(metrics, step=int(step))

    def close(self):
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(workdir, config):
    """Resuming a workdir continues the same wandb run (its id is kept in WORKDIR/wandb_id)."""
    import wandb

    id_file = Path(workdir) / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    w = config.logging.wandb
    return wandb.init(
        project=w.project, entity=w.entity or None, name=w.name or Path(workdir).name, mode=w.mode,
        dir=str(workdir), config=config.to_dict(), id=run_id, resume="allow",
    )
