"""The progress table: one plain-text line per run, read from the runs' folders."""
import json
import time
from pathlib import Path

from lmjax.grid.status import elapsed_s

TAIL_BYTES = 64 * 1024  # enough for the last train and eval lines of metrics.jsonl


def latest_metrics(workdir) -> dict:
    """{"step", "train/loss", "eval": (name, value)} from the tail of WORKDIR/metrics.jsonl; missing keys absent.

    The eval figure is the latest line's first `eval/*acc*` metric (sorted by name), else `eval/loss`.
    """
    path = Path(workdir) / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return {}
    found = {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:  # the first line of the tail, cut in half, or a line being written
            continue
        if not isinstance(row, dict):
            continue
        if "step" not in found and "step" in row:
            found["step"] = row["step"]
        if "train/loss" not in found and "train/loss" in row:
            found["train/loss"] = row["train/loss"]
        if "eval" not in found:
            accs = sorted(k for k in row if k.startswith("eval/") and "acc" in k)
            key = accs[0] if accs else ("eval/loss" if "eval/loss" in row else None)
            if key:
                found["eval"] = (key, row[key])
        if len(found) == 3:
            break
    return found


def _number(value, digits=4):
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def run_row(run, status, now=None) -> list:
    """[name, status, step/steps, loss, eval, seconds] as text."""
    metrics = latest_metrics(run.workdir)
    step = metrics.get("step")
    loss = metrics.get("train/loss")
    evaluation = metrics.get("eval")
    seconds = elapsed_s(run.workdir, now) if status != "pending" else None
    return [
        run.name,
        status,
        f"{step if step is not None else '-'}/{run.steps}",
        _number(loss) if loss is not None else "-",
        f"{evaluation[0].removeprefix('eval/')} {_number(evaluation[1], 3)}" if evaluation else "-",
        f"{seconds:.0f} s" if seconds is not None else "-",
    ]


def counts_line(name, statuses, elapsed) -> str:
    """`grid NAME: 2 done, 1 running, 3 pending, 0 failed (1 interrupted) | 35 s`."""
    count = {s: list(statuses).count(s) for s in ("done", "running", "pending", "failed", "interrupted")}
    line = f"grid {name}: {count['done']} done, {count['running']} running, {count['pending']} pending, {count['failed']} failed"
    if count["interrupted"]:
        line += f", {count['interrupted']} interrupted"
    return f"{line} | {elapsed:.0f} s"


def format_table(name, runs, statuses, elapsed, now=None) -> str:
    """The header line, then one aligned line per run. `statuses`: run name -> status."""
    now = now or time.time()
    rows = [["run", "status", "step", "loss", "eval", "time"]]
    rows += [run_row(run, statuses[run.name], now) for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [counts_line(name, [statuses[r.name] for r in runs], elapsed)]
    for row in rows:
        cells = [cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
