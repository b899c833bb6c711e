"""Where an evaluation's results go: WORKDIR/eval/STEP/results.json, and one row with the
checkpoint's step appended to the run's metrics (metrics.jsonl, TensorBoard and wandb when the
run logs to them), so curves over training come out of the files the plots already read.

The trainer may be writing the same metrics.jsonl meanwhile: a row is appended with one write
on a file opened for appending, which the OS keeps whole between writers. TensorBoard gets an
events file of its own in WORKDIR/tb/ (TensorBoard reads every file there). wandb keeps a run's
steps increasing and would drop an old step, so evaluation rows go to the run with their own
x-axis, `eval/step` (wandb's define_metric).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from lmjax.monitor.metrics import CannotWrite, _plain

RESULTS_FILE = "results.json"


def results_path(workdir, step: int) -> Path:
    return Path(workdir) / "eval" / str(int(step)) / RESULTS_FILE


def write_results(path, payload: dict):
    """`payload` as JSON at `path`, under a temporary name first: readers never see half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as error:
        raise CannotWrite(path, error) from error


def append_metrics(workdir, config, step: int, metrics: dict):
    """One row {"step": step, **metrics} at the end of WORKDIR/metrics.jsonl, and the same to the
    run's TensorBoard and wandb when its config logs to them."""
    workdir = Path(workdir)
    row = json.dumps({"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}) + "\n"
    path = workdir / "metrics.jsonl"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, row.encode())
        finally:
            os.close(fd)
    except OSError as error:
        raise CannotWrite(path, error) from error
    logging = config.logging
    if logging.tensorboard:
        from lmjax.monitor.metrics import TensorboardEvents

        try:
            events = TensorboardEvents(workdir / "tb")
            events.write(step, metrics)
            events.close()
        except OSError as error:
            raise CannotWrite(workdir / "tb", error) from error
    if logging.wandb.mode != "disabled":
        _log_to_wandb(workdir, logging.wandb, step, metrics)


def _log_to_wandb(workdir, section, step, metrics):
    import wandb

    from lmjax.monitor.metrics import wandb_run_id

    run_id, _ = wandb_run_id(workdir)
    run = wandb.init(project=section.project, entity=section.entity or None, name=section.name or workdir.name,
                     mode=section.mode, dir=str(workdir), id=run_id, resume="allow")
    try:
        run.define_metric("eval/step")
        run.define_metric("eval/*", step_metric="eval/step")
        run.log({**metrics, "eval/step": int(step)})
    finally:
        run.finish()
