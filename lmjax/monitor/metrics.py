"""Metric sinks: WORKDIR/metrics.jsonl (always), tensorboardX events in WORKDIR/tb/, wandb.

A sink that cannot write (a full disk, a folder that is not writable) raises `CannotWrite`,
naming the file: `cannot write WORKDIR/metrics.jsonl: No space left on device`. Every sink writes
from the calling thread, so the error reaches the training loop (tensorboardX's own writer would
write from a thread of its own, where an error prints a traceback and the next events block).
"""
import errno
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path


class CannotWrite(OSError):
    """A file of the run folder could not be written: one line `cannot write PATH: REASON`."""

    def __init__(self, path, error: OSError):
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        super().__init__(getattr(error, "errno", None) or errno.EIO, reason, str(path))

    def __str__(self):
        return f"cannot write {self.filename}: {self.strerror}"


class MetricsFileError(ValueError):
    """metrics.jsonl holds an unreadable line before its last: one line saying which."""


def _import_tensorboardx():
    """tensorboardX imports torch when it is installed (~1.5 s of start-up here) only to name
    torch.Tensor in type hints; lmjax logs floats, so torch is hidden during that import unless
    something has loaded it already. Returns (EventsWriter, Event, Summary)."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX allows
    try:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
    finally:
        if hide:
            del sys.modules["torch"]
    return EventsWriter, Event, Summary


class TensorboardEvents:
    """WORKDIR/tb/events.out.tfevents.*: one event of scalars per `write`, written and flushed
    in the calling thread (tensorboardX's EventsWriter, without its background thread)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        EventsWriter, self._event, self._summary = _import_tensorboardx()
        self._writer = EventsWriter(str(self.folder / "events"))
        self._writer.flush()

    def write(self, step: int, metrics: dict):
        values = [self._summary.Value(tag=name, simple_value=float(value)) for name, value in metrics.items()]
        event = self._event(wall_time=time.time(), step=int(step), summary=self._summary(value=values))
        self._writer.write_event(event)
        self._writer.flush()

    def close(self):
        self._writer.close()


def _plain(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _warn(message: str):
    print(f"lmjax: warning: {message}", file=sys.stderr, flush=True)


class MetricWriter:
    """Writes `{"step": s, name: value, ...}` lines; only the lead process writes (`enabled`).
    A write that fails raises `CannotWrite` naming the file."""

    def __init__(self, workdir, logging, run_config: dict, *, enabled: bool = True, resume_step: int | None = None):
        """`logging`: the config's logging section; `run_config`: the whole config as a dict, for
        wandb; `resume_step`: the checkpoint step training resumes from, None when it starts at
        step 0 (see `_drop_lines_after`)."""
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path = self.workdir / "metrics.jsonl"
        self._drop_lines_after(-1 if resume_step is None else resume_step)
        try:
            self._file = open(self.path, "a")
        except OSError as error:
            raise CannotWrite(self.path, error) from error
        if logging.tensorboard:
            try:
                self._tb = TensorboardEvents(self.workdir / "tb")
            except OSError as error:
                raise CannotWrite(self.workdir / "tb", error) from error
        if logging.wandb.mode != "disabled":
            self._wandb = WandbRun(self.workdir, logging.wandb, run_config)

    def _drop_lines_after(self, step: int):
        """Lines logged after `step` will be logged again: drop them (a resume from checkpoint
        `step`; -1: training starts over, after an attempt that died before its first checkpoint).
        A last line that is not a JSON row (the process died while writing it) is dropped with a
        warning; an unreadable line before it is a MetricsFileError."""
        if not self.path.is_file():  # (a device, say, is not read)
            return
        text = self.path.read_bytes().decode("utf-8", "replace")
        lines = text.splitlines()
        numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
        kept = []
        for number, line in numbered:
            row_step = _row_step(line)
            if row_step is None and number == numbered[-1][0]:
                _warn(f"dropped the last line of {self.path}, cut short by a crash while it was written: {line[:60]!r}")
            elif row_step is None:
                raise MetricsFileError(
                    f"{self.path}:{number} is not a JSON object with a \"step\" ({line[:60]!r}); only the last line "
                    f"may be cut short by a crash. Repair or delete that line, then resume."
                )
            elif row_step <= step:
                kept.append(line)
        if kept != lines or (text and not text.endswith("\n")):  # (a whole last row may still lack its newline)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            try:  # under another name, then renamed: a full disk here leaves the old file whole
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, self.path)
            except OSError as error:
                raise CannotWrite(self.path, error) from error

    def write(self, step: int, metrics: dict):
        if not self.enabled or not metrics:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as error:
            raise CannotWrite(self.path, error) from error
        if self._tb is not None:
            try:
                self._tb.write(step, metrics)
            except OSError as error:
                raise CannotWrite(self._tb.folder, error) from error
        if self._wandb is not None:
            self._wandb.log(int(step), metrics)

    def close(self):
        """Close every sink; the first that cannot write its last lines raises, once all are closed."""
        if not self.enabled:
            return
        failed = None
        for path, close in ((self.path, self._file.close), (self.workdir / "tb", self._tb and self._tb.close),
                            (None, self._wandb and self._wandb.finish)):
            try:
                if close:
                    close()
            except OSError as error:
                failed = failed or CannotWrite(path or self.workdir, error)
        if failed:
            raise failed


def _row_step(line: str):
    """The step of a metrics.jsonl line, or None when the line is not a JSON row with a step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None


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
