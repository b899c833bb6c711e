"""Run a grid's unfinished runs on this machine, at most `parallel` processes at a time.

Each run is its own `python -m lmjax.main` process (output to WORKDIR/grid_run.log), so a run that
fails or is killed never takes the others down, and rerunning the grid resumes: finished runs are
skipped, interrupted ones restart from their checkpoint. Ctrl-C (or SIGTERM) sends SIGTERM to the
children, which save a checkpoint at the current step, waits for them and returns.

Threads are left alone: XLA:CPU sizes its thread pools to the CPUs the process may use, and
OMP_NUM_THREADS does not change it; K runs share the cores through the OS scheduler. To split the
cores instead, start the grid under `taskset`, or keep --parallel at 1 for the fastest single runs.
"""
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

import lmjax
from lmjax.grid.status import ATTEMPT, GRID_JSON, LOG, read_attempt, read_summary, run_status, write_json
from lmjax.grid.table import format_table

LOG_TAIL_LINES = 20
STOP_TIMEOUT_S = 120  # after SIGTERM, how long a child may take to save its checkpoint before SIGKILL


@dataclasses.dataclass
class Report:
    """What run_local did: the runs it launched, every selected run's final status, exit codes."""

    launched: list
    statuses: dict  # run name -> done | failed | interrupted | pending | running
    exit_codes: dict  # run name -> exit status of its last process (launched runs only)
    interrupted: bool  # stopped by Ctrl-C / SIGTERM
    seconds: float

    @property
    def failed(self):
        return [name for name, status in self.statuses.items() if status == "failed"]


def write_grid_json(grid, run):
    run.workdir.mkdir(parents=True, exist_ok=True)
    write_json(run.workdir / GRID_JSON, {
        "grid": grid.name, "labels": run.labels, "overrides": run.overrides, "command": run.command,
        "config": str(grid.config),
    })


def child_env():
    """The runner's environment, with this lmjax importable and output unbuffered (the log stays current)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    source_root = str(Path(lmjax.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    return env


class _Child:
    def __init__(self, grid, run, env):
        write_grid_json(grid, run)
        self.run, self.started, self.stopped = run, time.time(), False
        self.log = open(run.workdir / LOG, "ab")
        self.log.write(f"=== lmjax.grid {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(run.command)}\n".encode())
        self.log.flush()
        self.log_start = self.log.tell()
        self.proc = subprocess.Popen(
            run.command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # the terminal's Ctrl-C reaches the runner only; it stops children itself
        )
        try:
            self.pid_created = psutil.Process(self.proc.pid).create_time()
        except psutil.Error:  # already gone
            self.pid_created = None
        self._record("running")

    def _record(self, status, **extra):
        write_json(self.run.workdir / ATTEMPT, {
            "status": status, "host": socket.gethostname(), "pid": self.proc.pid, "pid_created": self.pid_created,
            "started": self.started, **extra,
        })

    def finish(self):
        """Record how the process ended; returns the exit status."""
        self.log.close()
        code = self.proc.returncode
        summary = read_summary(self.run.workdir)
        if summary is not None and summary.get("interrupted") is False and code == 0:
            status, extra = "finished", {}
        elif self.stopped or (summary is not None and summary.get("interrupted") and code == 143):
            status, extra = "stopped", {}  # SIGTERM: a checkpoint was saved (or none was reached yet)
        else:
            status, extra = "failed", {"log_tail": self._log_tail()}
            if code == 0:
                extra["reason"] = "exited with status 0 but wrote no finished summary.json"
        self._record(status, exit_code=code, ended=time.time(), **extra)
        return code

    def _log_tail(self):
        with open(self.run.workdir / LOG, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode("utf-8", "replace").splitlines()[-LOG_TAIL_LINES:]


class _Display:
    """Redraws the table in place on a terminal; elsewhere prints it when a status changes, or every minute."""

    def __init__(self, grid, runs, out, refresh_s):
        self.grid, self.runs, self.out, self.refresh_s = grid, runs, out, refresh_s
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.start = time.time()
        self.shown_lines, self.last_key, self.last_time, self.last_table = 0, None, 0.0, None

    def update(self, statuses, force=False):
        now = time.time()
        key = tuple(statuses[r.name] for r in self.runs)
        due = now - self.last_time >= (self.refresh_s if self.tty else 60.0)
        if not (force or due or (not self.tty and key != self.last_key)):
            return
        table = format_table(self.grid.name, self.runs, statuses, now - self.start, now)
        if table == self.last_table and not self.tty:
            return
        if self.tty and self.shown_lines:
            fits = self.shown_lines < shutil.get_terminal_size().lines
            # back to the old table's first line (or, if it scrolled off, the screen's top) and clear below
            self.out.write(f"\x1b[{self.shown_lines}F\x1b[J" if fits else "\x1b[H\x1b[J")
        self.out.write(table + "\n")
        self.out.flush()
        self.shown_lines = table.count("\n") + 1 if self.tty else 0
        self.last_key, self.last_time, self.last_table = key, now, table

    def note(self, message):
        """A line below the table, which the next redraw keeps."""
        self.out.write(message + "\n")
        self.out.flush()
        self.shown_lines = 0


def selected_runs(grid, only=None):
    return [run for run in grid.runs if not only or only in run.name]


def runs_to_launch(runs, statuses, retry_failed=False):
    """Pending and interrupted runs (they resume), and failed ones with `retry_failed`, in grid order."""
    wanted = ("pending", "interrupted", "failed") if retry_failed else ("pending", "interrupted")
    return [run for run in runs if statuses[run.name] in wanted]


def run_local(grid, parallel=1, *, only=None, retry_failed=False, out=None, refresh_s=3.0) -> Report:
    """Run the grid's runs that are not done (and not failed, unless `retry_failed`) with at most
    `parallel` processes at a time; print the progress table to `out` (default stdout)."""
    out = out or sys.stdout
    runs = selected_runs(grid, only)
    statuses = {run.name: run_status(run) for run in runs}
    queue = runs_to_launch(runs, statuses, retry_failed)
    display = _Display(grid, runs, out, refresh_s)
    running, launched, exit_codes, interrupted = {}, [], {}, False
    env, start = child_env(), time.time()
    previous = _stop_signals_raise_keyboard_interrupt()
    try:
        try:
            while queue or running:
                while queue and len(running) < max(1, parallel):
                    run = queue.pop(0)
                    running[run.name] = _Child(grid, run, env)
                    launched.append(run.name)
                    statuses[run.name] = "running"
                for name, child in list(running.items()):
                    if child.proc.poll() is not None:
                        exit_codes[name] = child.finish()
                        statuses[name] = run_status(child.run)
                        del running[name]
                display.update(statuses)
                time.sleep(0.2 if not running else 0.5)
        except KeyboardInterrupt:
            interrupted = True
            _stop(running, display)
            for name, child in running.items():
                exit_codes[name] = child.finish()
                statuses[name] = run_status(child.run)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    statuses = {run.name: run_status(run) for run in runs}
    display.update(statuses, force=True)
    return Report(launched, statuses, exit_codes, interrupted, time.time() - start)


def _stop_signals_raise_keyboard_interrupt():
    """Ctrl-C, and SIGTERM from a scheduler or `kill`, stop the runner; returns the previous handlers.

    SIGINT is set too, not left to Python's default: the process embedding the runner (a
    notebook, a test session, a library that set its own handler) may have replaced it.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers belong to the main thread

    def handler(signum, frame):
        raise KeyboardInterrupt

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}


def _stop(running, display):
    """SIGTERM every child (lmjax saves a checkpoint), wait; a second Ctrl-C, or STOP_TIMEOUT_S, kills them."""
    if not running:
        return
    display.note(f"lmjax.grid: stopping {len(running)} run(s) with SIGTERM (they save a checkpoint); "
                 f"Ctrl-C again to kill them")
    for child in running.values():
        child.stopped = True
        if child.proc.poll() is None:
            child.proc.terminate()
    deadline = time.time() + STOP_TIMEOUT_S
    try:
        while any(child.proc.poll() is None for child in running.values()):
            if time.time() > deadline:
                raise KeyboardInterrupt
            time.sleep(0.2)
    except KeyboardInterrupt:
        for child in running.values():
            if child.proc.poll() is None:
                os.killpg(child.proc.pid, signal.SIGKILL)
        for child in running.values():
            child.proc.wait()


def summary_line(grid, report) -> str:
    counts = {s: list(report.statuses.values()).count(s) for s in ("done", "failed", "interrupted", "pending", "running")}
    shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == "done")
    line = f"lmjax.grid: {grid.name}: {shown}; launched {len(report.launched)} in {report.seconds:.0f} s; runs in {grid.root}"
    return line


def failure_lines(runs, report):
    """One line per failed run: its exit status and the last line of its output."""
    lines = []
    for run in runs:
        if report.statuses.get(run.name) != "failed":
            continue
        attempt = read_attempt(run.workdir) or {}
        last = next((line for line in reversed(attempt.get("log_tail", [])) if line.strip()), attempt.get("reason", ""))
        lines.append(f"  failed: {run.name} (exit {attempt.get('exit_code')}): {last.strip()}  [{run.workdir / LOG}]")
    return lines
