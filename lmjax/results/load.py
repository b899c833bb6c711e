"""Run folders -> pandas DataFrames: one row per run (`load_runs`) or per logged step (`load_histories`).

A run folder holds `config.json` (the resolved config), `metrics.jsonl` (one JSON object a line,
always with "step"), and, optionally, `summary.json` (written at the end) and `grid.json` (written
by the grid runner: {"grid": name, "labels": {key: value}, ...}).

    runs = load_runs("runs/grid-facts")                 # every run folder below, recursively
    runs.groupby(["data.mode", "data.num_people"])["eval/qa_recall"].mean()
    hist = load_histories("runs/grid-facts", columns=["data.mode", "seed"])
    first_reaching(hist, "eval/qa_acc", 0.95)           # step and time of the first crossing

Reading is forgiving, because runs are read while they train: a half-written last line of
metrics.jsonl is skipped, a missing file gives NaNs, and metric values logged as strings
("nan", "inf") become floats.
"""
from __future__ import annotations

import glob
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

RUN_MARKER = "config.json"
TIME_COLUMN = "time/since_start_s"

# Columns every row of load_runs starts with, in this order.
_RUN_COLUMNS = ("workdir", "name", "status")
# Words that mark a metric where lower is better; every other metric is better higher.
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error", "bpb", "bits_per_byte")


def higher_is_better(metric: str) -> bool:
    """False for loss-like metric names (loss, perplexity/ppl, error, bpb), True otherwise (acc, recall)."""
    last = metric.rsplit("/", 1)[-1].lower()
    return not any(word in last for word in _LOWER_IS_BETTER)


# ----------------------------------------------------------------------------- finding runs


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def find_runs(*paths) -> list[Path]:
    """Run folders (folders with a config.json) at or below each path, sorted and deduplicated.

    A path is a run folder, a folder searched recursively (the search does not descend into a
    run folder), or a glob pattern (`runs/grid-*`, `runs/**/facts-*`). Raises ValueError naming
    the path when one gives no run at all.
    """
    if not paths:
        raise ValueError("No paths given; pass one or more run folders, folders of runs or glob patterns.")
    found = set()
    for path in paths:
        text = os.fspath(path)
        roots = sorted(glob.glob(text, recursive=True)) if _is_glob(text) else [text]
        runs = [run for root in roots for run in _runs_below(Path(root))]
        if not runs:
            why = "it does not exist" if not roots or not any(Path(r).exists() for r in roots) else (
                f"no folder at or below it holds a {RUN_MARKER}")
            raise ValueError(f"No runs in {text!r}: {why}; point at a run folder or a folder of runs.")
        found.update(run.resolve() for run in runs)
    return sorted(found)


def _runs_below(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    if (root / RUN_MARKER).is_file():
        return [root]
    runs = []
    for folder, subfolders, files in os.walk(root):
        if RUN_MARKER in files:
            runs.append(Path(folder))
            subfolders[:] = []  # checkpoints/, data/, tb/ of a run are not runs
        else:
            subfolders.sort()
    return runs


# ----------------------------------------------------------------------------- reading one run


@dataclass
class _Run:
    workdir: Path
    config: dict = field(default_factory=dict)  # flattened, dotted keys
    grid: dict = field(default_factory=dict)  # grid.json, as written
    summary: dict | None = None
    history: dict = field(default_factory=dict)  # step -> {metric: value}, lines of one step merged

    @property
    def last_step(self):
        return max(self.history) if self.history else None


def _read_json(path: Path, what: str):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"Skipping unreadable {what} {str(path)!r}: {err}", stacklevel=3)
        return None


def _number(value):
    """Metric values: numbers and numeric strings ("nan", "inf") as float; other values as they are."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _read_metrics(path: Path) -> dict:
    """step -> merged metrics. Unparsable lines (a half-written last line while training) are skipped."""
    history: dict = {}
    if not path.is_file():
        return history
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError):
            if i != len(lines) - 1:  # the last line may simply be still being written
                warnings.warn(f"Skipping unreadable line {i + 1} of {str(path)!r}.", stacklevel=3)
            continue
        history.setdefault(step, {}).update({k: _number(v) for k, v in row.items()})
    return history


def flatten(nested: dict, prefix: str = "") -> dict:
    """{"model": {"dim": 64}} -> {"model.dim": 64}; lists become tuples so columns stay groupable."""
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        elif isinstance(value, list):
            flat[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            flat[name] = value
    return flat


def _read_run(workdir: Path) -> _Run:
    config = _read_json(workdir / "config.json", "config")
    grid = _read_json(workdir / "grid.json", "grid file")
    return _Run(
        workdir=workdir,
        config=flatten(config) if isinstance(config, dict) else {},
        grid=grid if isinstance(grid, dict) else {},
        summary=_read_json(workdir / "summary.json", "summary"),
        history=_read_metrics(workdir / "metrics.jsonl"),
    )


def _put(row: dict, key: str, value, prefix: str):
    """Sets row[key], or row[prefix + key] when key is already taken by another source."""
    row[prefix + key if key in row else key] = value


def _label_columns(run: _Run) -> dict:
    """The grid name and the grid labels that are not config keys (those are already columns)."""
    labels = {}
    if "grid" in run.grid:
        labels["grid"] = run.grid["grid"]
    for key, value in (run.grid.get("labels") or {}).items():
        if key in run.config:
            continue
        _put(labels, key, value, "grid.")
    return labels


def _summary_is_current(run: _Run) -> bool:
    """A summary left by an interrupted run is stale once the resumed run logs later steps."""
    if not isinstance(run.summary, dict):
        return False
    last = run.last_step
    return last is None or "step" not in run.summary or last <= run.summary["step"]


def _status(run: _Run) -> str:
    if not _summary_is_current(run):
        return "incomplete"
    return "interrupted" if run.summary.get("interrupted") else "done"


def _final_metrics(run: _Run) -> dict:
    """The last value of every metric, overridden by summary.json when it is current."""
    final = {}
    for step in sorted(run.history):
        final.update(run.history[step])
    if run.history:
        final["step"] = run.last_step
    if _summary_is_current(run):
        final.update({k: _number(v) for k, v in run.summary.items()})
    if "params" not in final and "model/params" in final:
        final["params"] = final["model/params"]
    return final


def _best_metrics(run: _Run, final: dict) -> dict:
    """best/<metric> for every eval/ metric: the max (or min, for loss-like names) over the history."""
    values: dict = {}
    for metrics in run.history.values():
        for key, value in metrics.items():
            if key.startswith("eval/"):
                values.setdefault(key, []).append(value)
    for key, value in final.items():
        if key.startswith("eval/"):
            values.setdefault(key, []).append(value)
    best = {}
    for key, seen in values.items():
        numbers = [float(v) for v in seen if isinstance(v, (int, float)) and not isinstance(v, bool)]
        numbers = [v for v in numbers if not math.isnan(v)]
        if numbers:
            best[f"best/{key}"] = max(numbers) if higher_is_better(key) else min(numbers)
        else:
            best[f"best/{key}"] = np.nan
    return best


def _run_row(run: _Run) -> dict:
    row = {"workdir": str(run.workdir), "name": run.workdir.name, "status": _status(run)}
    final = _final_metrics(run)
    for key in ("step", "params"):  # the two final numbers most tables want first
        if key in final:
            row[key] = final.pop(key)
    for key, value in run.config.items():
        _put(row, key, value, "config.")
    for key, value in _label_columns(run).items():
        _put(row, key, value, "grid.")
    for key, value in final.items():
        _put(row, key, value, "final.")
    for key, value in _best_metrics(run, final).items():
        _put(row, key, value, "final.")
    return row


# ----------------------------------------------------------------------------- public tables


def load_runs(*paths) -> pd.DataFrame:
    """One row per run found by `find_runs(*paths)`.

    Columns: `workdir`, `name` (the folder name), `status` ("done", "interrupted", or
    "incomplete": no current summary.json, so still running, crashed or killed), `step` (the
    last step), `params`; the flattened config with dotted names (`model.dim`, `data.mode`,
    `seed`); `grid` (the grid's name) and the grid labels that are not config keys (a label
    such as `mode` becomes a column of its own, `grid.<label>` if the name is taken); the final
    value of every metric (summary.json when present and current, else the last logged value);
    and `best/<metric>` for every `eval/` metric (max, or min for loss-like names: see
    `higher_is_better`). A run without some column has NaN there.
    """
    rows = [_run_row(_read_run(workdir)) for workdir in find_runs(*paths)]
    return pd.DataFrame(rows)


def load_histories(*paths, columns=None) -> pd.DataFrame:
    """Long format: one row per (run, step) with `workdir`, `name`, `step` and one column per metric.

    Lines of metrics.jsonl with the same step are merged into one row. Each row also carries its
    run's descriptive columns so curves can be grouped by any of them: by default the whole
    flattened config, `grid` and the grid labels; `columns=[...]` attaches only those (any
    column of `load_runs` except the metrics, e.g. ["data.mode", "seed", "params", "status"]),
    `columns=[]` none.
    """
    frames = []
    for workdir in find_runs(*paths):
        run = _read_run(workdir)
        steps = sorted(run.history)
        frame = pd.DataFrame([{"step": s, **run.history[s]} for s in steps], columns=None if steps else ["step"])
        metric_names = set(frame.columns)
        if columns is None:
            extra = {**run.config, **_label_columns(run)}
        else:
            row = _run_row(run)
            clashing = [c for c in columns if c in metric_names and c != "step"]
            if clashing:
                raise ValueError(
                    f"{clashing[0]!r} is a logged metric, already a column of the histories; "
                    "ask `columns=` for config or label columns only."
                )
            extra = {c: row.get(c, np.nan) for c in columns if c not in ("workdir", "name", "step")}
        extra = {(f"config.{k}" if k in metric_names else k): v for k, v in extra.items()}
        n = len(frame)
        ids = pd.DataFrame({"workdir": [str(workdir)] * n, "name": [workdir.name] * n})
        labels = pd.DataFrame({key: [value] * n for key, value in extra.items()}, index=frame.index)
        frames.append(pd.concat([ids, frame, labels], axis=1))
    frames = [f for f in frames if len(f)] or frames[:1]
    return pd.concat(frames, ignore_index=True, sort=False)


# ----------------------------------------------------------------------------- thresholds


def _reached(values: pd.Series, threshold: float, higher: bool | None, metric: str) -> np.ndarray:
    if higher is None:
        higher = higher_is_better(metric)
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        return numbers >= threshold if higher else numbers <= threshold


def _time_at(history: pd.DataFrame, step) -> float:
    """time/since_start_s at `step`: the logged value, else linear in step between logged ones."""
    if TIME_COLUMN not in history or math.isnan(step):
        return np.nan
    known = history[["step", TIME_COLUMN]].apply(pd.to_numeric, errors="coerce").dropna().sort_values("step")
    if known.empty or not known["step"].min() <= step <= known["step"].max():
        return np.nan
    return float(np.interp(step, known["step"], known[TIME_COLUMN]))


def step_reaching(history: pd.DataFrame, metric: str, threshold: float, higher: bool | None = None) -> float:
    """The first step of one run's history where `metric` reaches `threshold`, NaN if never.

    Reaching is >= threshold, or <= for loss-like metrics (`higher_is_better`; `higher=`
    overrides). NaN values never reach.
    """
    if metric not in history:
        return np.nan
    ordered = history.sort_values("step")
    hits = ordered["step"].to_numpy()[_reached(ordered[metric], threshold, higher, metric)]
    return float(hits[0]) if len(hits) else np.nan


def first_reaching(histories: pd.DataFrame, metric: str, threshold: float, higher: bool | None = None,
                   by: str = "workdir") -> pd.DataFrame:
    """Per run (index: `by`), the `step` and `time/since_start_s` when `metric` first reaches `threshold`.

    Both are NaN for a run that never reaches it. The time is the one logged at that step, or,
    when that line has no time (e.g. a train/ metric between evals), linear in step between the
    neighbouring logged times (NaN outside them).
    """
    if metric not in histories:
        logged = sorted(c for c in histories.columns if "/" in c)
        raise ValueError(f"No run logged {metric!r}; logged metrics: {', '.join(logged) or 'none'}.")
    rows = {}
    for key, run in histories.groupby(by, sort=True):
        step = step_reaching(run, metric, threshold, higher)
        rows[key] = {"step": step, TIME_COLUMN: _time_at(run, step)}
    out = pd.DataFrame.from_dict(rows, orient="index", columns=["step", TIME_COLUMN])
    out.index.name = by
    return out
