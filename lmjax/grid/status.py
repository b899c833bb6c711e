"""Where a run stands, read from its folder: done, failed, interrupted, running or pending.

Files the grid runner keeps in a run's folder (beside lmjax.main's own outputs):
  grid.json         {"grid", "labels", "overrides", "command", "config"}: what the run is
  grid_run.log      the run's stdout and stderr, every attempt appended after a `=== ` header line
  grid_status.json  the last attempt: status (running, finished, stopped, failed), exit_code,
                    host, pid, pid_created, started, ended, log_tail (the last lines of its output)
"""
import json
import os
import socket
import time
from pathlib import Path

import psutil

GRID_JSON, LOG, ATTEMPT = "grid.json", "grid_run.log", "grid_status.json"
STATUSES = ("done", "running", "interrupted", "pending", "failed")


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):  # absent, or caught half-written
        return None


def read_summary(workdir):
    return _read_json(Path(workdir) / "summary.json")


def read_attempt(workdir):
    return _read_json(Path(workdir) / ATTEMPT)


def write_json(path, record):
    """Write atomically: a reader (another runner, the results loader) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def has_checkpoint(workdir) -> bool:
    folder = Path(workdir) / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())  # orbax: one folder per step


def attempt_alive(attempt) -> bool:
    """True while the process of a `running` attempt still runs on this host (a runner that was killed
    leaves its children running): same pid, same process start time (so a reused pid does not count)."""
    if not attempt or attempt.get("status") != "running" or attempt.get("host") != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(int(attempt["pid"])).create_time() - attempt["pid_created"]) < 1e-3
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def run_status(run) -> str:
    """'done' | 'failed' | 'running' | 'interrupted' | 'pending' for a Run (or anything with .workdir)."""
    workdir = Path(getattr(run, "workdir", run))
    summary = read_summary(workdir)
    if summary is not None and summary.get("interrupted") is False:
        return "done"
    attempt = read_attempt(workdir)
    if attempt and attempt.get("status") == "failed":
        return "failed"
    if attempt_alive(attempt):
        return "running"
    if summary is not None or has_checkpoint(workdir):
        return "interrupted"  # rerunning the command resumes from the checkpoint
    return "pending"


def elapsed_s(workdir, now=None):
    """Seconds of the last attempt (still counting while it runs), else the summary's own figure."""
    attempt = read_attempt(workdir)
    if attempt and attempt.get("started"):
        if attempt.get("ended"):
            return attempt["ended"] - attempt["started"]
        if attempt_alive(attempt):
            return (now or time.time()) - attempt["started"]
    summary = read_summary(workdir)
    return summary.get("seconds_since_start") if summary else None
