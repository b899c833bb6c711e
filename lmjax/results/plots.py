"""Plots of run tables (`load_runs`) and histories (`load_histories`), written as PNG files.

Every function takes a DataFrame, writes one PNG to `out` (parent folders are created) and
returns its path, or the fitted numbers where there is a fit. Figures are drawn on
`matplotlib.figure.Figure` objects, which render with the Agg backend without touching pyplot's
global state: safe in scripts, tests, threads and notebooks alike.

    runs = load_runs("runs/grid-facts")
    fits = plot_smallest_model(runs, "data.num_people", "params", "eval/qa_recall", 0.95,
                               "plots/smallest.png", group_by="data.mode",
                               x_transform=lambda n: 4 * n, reference_params_per_fact=(8,))
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from matplotlib.tri import Triangulation

from lmjax.results import capacity

DPI = 150


# ----------------------------------------------------------------------------- shared helpers


def _figure(width=6.4, height=4.4):
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.35)
    return fig, ax


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out


def _fmt(value) -> str:
    """64.0 -> "64", 0.5 -> "0.5", ("a", 1) -> "a, 1"."""
    if isinstance(value, tuple):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _require(df: pd.DataFrame, *columns):
    missing = [c for c in columns if c is not None and c not in df.columns]
    if missing:
        shown = ", ".join(map(str, list(df.columns)[:30]))
        raise ValueError(f"No column {missing[0]!r}; the table has: {shown}{' ...' if len(df.columns) > 30 else ''}.")


def _group_columns(group_by) -> list:
    if group_by is None:
        return []
    return [group_by] if isinstance(group_by, str) else list(group_by)


def _groups(df: pd.DataFrame, group_by):
    """[(label, sub-frame)] sorted by group value; one group "all" when group_by is None."""
    columns = _group_columns(group_by)
    if not columns:
        return [("all", df)]
    _require(df, *columns)
    key = columns[0] if len(columns) == 1 else columns
    return [(_fmt(value), part) for value, part in df.groupby(key, dropna=False, sort=True)]


def _colors(n: int):
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(1, n - 1)) for i in range(n)]


def _legend_title(group_by):
    columns = _group_columns(group_by)
    return ", ".join(columns) if columns else None


def _numeric(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce")


# ----------------------------------------------------------------------------- curves


def _ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style smoothing: s_t = weight * s_{t-1} + (1 - weight) * v_t, debiased."""
    out, last, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = last / norm
    return out


def _run_curve(run: pd.DataFrame, metric: str, x: str, smooth: float):
    """(x, y) of one run, sorted; x other than step is filled in linearly over step where missing."""
    run = run.sort_values("step")
    steps = _numeric(run["step"]).to_numpy(float)
    xs = _numeric(run[x]).to_numpy(float) if x in run else np.full(len(run), np.nan)
    if x != "step":
        known = ~np.isnan(xs)
        if known.sum() >= 2:
            inside = (steps >= steps[known].min()) & (steps <= steps[known].max())
            xs = np.where(known, xs, np.where(inside, np.interp(steps, steps[known], xs[known]), np.nan))
    ys = _numeric(run[metric]).to_numpy(float)
    keep = ~np.isnan(xs) & ~np.isnan(ys)
    xs, ys = xs[keep], ys[keep]
    if smooth and len(ys):
        ys = _ema(ys, smooth)
    order = np.argsort(xs, kind="stable")  # time restarts when a run is resumed; keep x increasing
    return xs[order], ys[order]


def plot_curves(histories: pd.DataFrame, metric: str, group_by, out, x: str = "step", smooth: float = 0.0,
                aggregate: str = "mean", log_y: bool = False, title: str | None = None) -> Path:
    """`metric` against `x` (`step` or `time/since_start_s`), one colour per value of `group_by`.

    Each run (one `workdir`) is a thin line; a group of several runs (seeds) also gets a thick
    line, the `aggregate` ("mean" or "median") of its runs, linearly interpolated onto the union
    of their x values. The thick line spans only the x range every run of the group covers, so
    it never jumps where a run ends (a run stopped early ends it; its thin line shows the rest).
    `group_by` is a column, a list of columns, or None (one group). `smooth` in [0, 1) is
    TensorBoard's exponential smoothing weight, applied to each run before aggregating. An x
    other than `step` that is logged on fewer lines than the metric (time is logged at evals
    only) is filled in linearly over step.
    """
    _require(histories, metric, "workdir", "step")
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must lie in [0, 1) (an EMA weight), got {smooth!r}.")
    if aggregate not in ("mean", "median"):
        raise ValueError(f"aggregate must be 'mean' or 'median', got {aggregate!r}.")
    data = histories[histories[metric].notna()] if metric in histories else histories
    if data.empty:
        raise ValueError(f"No values of {metric!r} in the histories; nothing to plot.")
    fig, ax = _figure()
    groups = _groups(data, group_by)
    for (label, group), color in zip(groups, _colors(len(groups))):
        curves = [_run_curve(run, metric, x, smooth) for _, run in group.groupby("workdir", sort=True)]
        curves = [(xs, ys) for xs, ys in curves if len(xs)]
        if not curves:
            continue
        many = len(curves) > 1
        for xs, ys in curves:
            ax.plot(xs, ys, color=color, lw=0.8 if many else 1.8, alpha=0.35 if many else 1.0,
                    label=None if many else label)
        if many:
            lo, hi = max(xs[0] for xs, _ in curves), min(xs[-1] for xs, _ in curves)
            grid = np.unique(np.concatenate([xs for xs, _ in curves]))
            grid = grid[(grid >= lo) & (grid <= hi)]
            stacked = np.stack([np.interp(grid, xs, ys) for xs, ys in curves])
            center = (np.mean if aggregate == "mean" else np.median)(stacked, axis=0)
            ax.plot(grid, center, color=color, lw=2.2, marker="o" if len(grid) == 1 else None,
                    label=f"{label} ({aggregate} of {len(curves)})")
    ax.set_xlabel("seconds since start" if x == "time/since_start_s" else x)
    ax.set_ylabel(metric)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or f"{metric} vs {x}")
    ax.legend(title=_legend_title(group_by), fontsize="small")
    return _save(fig, out)


# ----------------------------------------------------------------------------- smallest model


def fit_power_law(x, y) -> tuple[float, float]:
    """Least-squares line in log10-log10: y ~= 10**intercept * x**slope; returns (slope, intercept)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)}).")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError("A power-law fit needs finite, positive x and y; drop NaN or zero rows first.")
    if len(np.unique(x)) < 2:
        raise ValueError("A power-law fit needs at least two distinct x values.")
    slope, intercept = np.polyfit(np.log10(x), np.log10(y), 1)
    return float(slope), float(intercept)


RULES = ("majority", "mean", "all", "any")


def smallest_model_reaching(runs: pd.DataFrame, n_col: str, size_col: str, metric: str, threshold: float,
                            group_by=None, rule: str = "majority") -> pd.DataFrame:
    """For each group and N: the smallest size whose runs reach `metric` >= `threshold`.

    Runs with the same group, N and size (seeds) are one cell, and a cell reaches when, by `rule`:
      "majority" (default)  strictly more than half of its runs reach (2 of 2, 2 of 3, 3 of 4);
      "mean"                the mean of the metric over its runs reaches;
      "all" / "any"         every / at least one run reaches.
    A run whose metric is NaN (crashed, still running) counts as not reaching (and is left out
    of "mean"). N values where no size reaches are left out.

    Returns one row per (group, N): the group columns, `n_col`, `size_col`, `runs` (in the
    cell), `reaching` (how many of them reach) and `metric` (its mean over the cell).
    """
    if rule not in RULES:
        raise ValueError(f"Unknown rule {rule!r}; choose one of: {', '.join(RULES)}.")
    groups = _group_columns(group_by)
    _require(runs, n_col, size_col, metric, *groups)
    data = runs[groups + [n_col, size_col]].copy()
    data[metric] = _numeric(runs[metric])
    data["_reaches"] = (data[metric] >= threshold).astype(int)
    cells = data.groupby(groups + [n_col, size_col], dropna=False, sort=True).agg(
        runs=("_reaches", "size"), reaching=("_reaches", "sum"), value=(metric, "mean")).reset_index()
    if rule == "majority":
        passed = 2 * cells["reaching"] > cells["runs"]
    elif rule == "mean":
        passed = cells["value"] >= threshold
    elif rule == "all":
        passed = cells["reaching"] == cells["runs"]
    else:
        passed = cells["reaching"] > 0
    cells = cells[passed].rename(columns={"value": metric})
    cells = cells.sort_values(groups + [n_col, size_col])
    smallest = cells.groupby(groups + [n_col], dropna=False, sort=True).head(1)
    return smallest.reset_index(drop=True)


def plot_smallest_model(runs: pd.DataFrame, n_col: str, size_col: str, metric: str, threshold: float, out,
                        group_by=None, x_transform=None, rule: str = "majority",
                        reference_params_per_fact=(), xlabel: str | None = None, ylabel: str | None = None,
                        title: str | None = None) -> dict:
    """Log-log plot of the smallest size reaching the threshold against N, with a power-law fit per group.

    `x_transform` maps N before plotting and fitting, e.g. `lambda n: 4 * n` to count facts
    when `n_col` counts people (`capacity.FACTS_PER_PERSON` = 4). Each group with >= 2 points
    gets a fitted line labelled with its exponent ("weights: params ∝ N^0.98"); `reference_
    params_per_fact=(8,)` adds dashed lines of 8 x N. Seeds are aggregated by `rule` (see
    `smallest_model_reaching`).

    Returns {group label: {"slope", "intercept", "params_per_fact", "points"}}: the fit
    (size ~= 10**intercept * x**slope; NaN with < 2 points) and the median of size / x over the
    smallest-model points.
    """
    table = smallest_model_reaching(runs, n_col, size_col, metric, threshold, group_by, rule)
    fig, ax = _figure()
    fits = {}
    groups = _groups(table, group_by) if len(table) else []
    all_x = []
    for (label, group), color in zip(groups, _colors(len(groups))):
        n = _numeric(group[n_col]).to_numpy(float)
        xs = np.asarray(x_transform(n) if x_transform else n, float)
        sizes = _numeric(group[size_col]).to_numpy(float)
        all_x.append(xs)
        fit = {"slope": np.nan, "intercept": np.nan, "params_per_fact": float(np.median(sizes / xs)),
               "points": len(xs)}
        ax.scatter(xs, sizes, color=color, s=30, zorder=3, label=None if len(np.unique(xs)) >= 2 else label)
        if len(np.unique(xs)) >= 2:
            slope, intercept = fit_power_law(xs, sizes)
            fit.update(slope=slope, intercept=intercept)
            line_x = np.geomspace(xs.min(), xs.max(), 50)
            ax.plot(line_x, 10 ** intercept * line_x ** slope, color=color, lw=1.6,
                    label=rf"{label}: {size_col} $\propto$ N$^{{{slope:.2f}}}$")
        fits[label] = fit
    if all_x and reference_params_per_fact:
        xs = np.concatenate(all_x)
        line_x = np.geomspace(xs.min(), xs.max(), 50)
        for k in reference_params_per_fact:
            ax.plot(line_x, k * line_x, color="0.45", ls="--", lw=1.0, label=f"{_fmt(k)} {size_col}/fact")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel or (f"N ({n_col}, transformed)" if x_transform else f"N ({n_col})"))
    ax.set_ylabel(ylabel or f"smallest {size_col}")
    ax.set_title(title or f"smallest {size_col} with {metric} ≥ {_fmt(threshold)} ({rule} of seeds)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title=_legend_title(group_by), fontsize="small")
    else:
        ax.text(0.5, 0.5, "no size reaches the threshold", transform=ax.transAxes, ha="center")
    _save(fig, out)
    return fits


# ----------------------------------------------------------------------------- contour


def plot_contour(runs: pd.DataFrame, x: str, y: str, metric: str, out, levels=None, log_x: bool = False,
                 log_y: bool = False, cmap: str = "viridis", title: str | None = None) -> Path:
    """Filled contour of `metric` (mean over seeds) over two config axes, with labelled lines.

    A full grid of (x, y) points is drawn with contourf; scattered points with tricontourf (the
    triangulation is made in log space for log axes). Sampled points are marked. `levels` is a
    number of levels or a list of values (default: 10 levels, or 0, 0.1, ..., 1 for a metric
    that lies in [0, 1]).
    """
    _require(runs, x, y, metric)
    data = pd.DataFrame({"x": _numeric(runs[x]), "y": _numeric(runs[y]), "z": _numeric(runs[metric])}).dropna()
    if log_x:
        data = data[data["x"] > 0]
    if log_y:
        data = data[data["y"] > 0]
    mean = data.groupby(["x", "y"], sort=True)["z"].mean().reset_index()
    if mean["x"].nunique() < 2 or mean["y"].nunique() < 2:
        raise ValueError(f"A contour needs at least two values of both {x!r} and {y!r} with a {metric!r}; "
                         f"got {mean['x'].nunique()} and {mean['y'].nunique()}.")
    if levels is None:
        levels = np.linspace(0, 1, 11) if mean["z"].between(0, 1).all() else 10
    fig, ax = _figure(6.4, 4.8)
    grid = mean.pivot(index="y", columns="x", values="z")
    if not grid.isna().to_numpy().any():
        filled = ax.contourf(grid.columns, grid.index, grid.to_numpy(), levels=levels, cmap=cmap, extend="both")
        lines = ax.contour(grid.columns, grid.index, grid.to_numpy(), levels=filled.levels, colors="k",
                           linewidths=0.7)
    else:
        tx, ty = mean["x"].to_numpy(), mean["y"].to_numpy()
        shape = Triangulation(np.log10(tx) if log_x else tx, np.log10(ty) if log_y else ty)
        tri = Triangulation(tx, ty, triangles=shape.triangles)
        filled = ax.tricontourf(tri, mean["z"].to_numpy(), levels=levels, cmap=cmap, extend="both")
        lines = ax.tricontour(tri, mean["z"].to_numpy(), levels=filled.levels, colors="k", linewidths=0.7)
    ax.clabel(lines, fmt=lambda v: f"{v:.3g}", fontsize="small")
    ax.scatter(mean["x"], mean["y"], marker="o", s=14, facecolors="white", edgecolors="k", zorder=3, clip_on=False)
    _sampled_ticks(ax, "x", mean["x"], log_x)
    _sampled_ticks(ax, "y", mean["y"], log_y)
    fig.colorbar(filled, ax=ax, label=metric)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title or f"{metric}, mean over seeds (○ = sampled runs)")
    return _save(fig, out)


def _sampled_ticks(ax, which: str, values, log: bool):
    """Log scale if asked; ticks at the sampled values, written plainly (64, not 6.4x10^1), when few."""
    if log:
        getattr(ax, f"set_{which}scale")("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    sampled = np.unique(values)
    if len(sampled) <= 12:
        axis.set_ticks(sampled, labels=[_fmt(v) for v in sampled])
        axis.set_minor_locator(NullLocator())


# ----------------------------------------------------------------------------- bits per parameter


def plot_bits_per_param(runs: pd.DataFrame, n_col: str, size_col: str, acc_col: str, out, group_by=None,
                        log_y: bool = False, title: str | None = None) -> Path:
    """Bits of facts stored per parameter (`capacity.bits_per_param`) against model size, log x.

    `n_col` is the number of people, `acc_col` the recall (or accuracy) in [0, 1], `size_col`
    the parameter count. Seeds (runs with the same group, N and size) are averaged. A dashed
    line marks Allen-Zhu & Li's reported 2 bits/param. In-tool runs keep their facts in the
    database, so their "bits per parameter" measure nothing: group by data.mode, or filter.
    """
    groups = _group_columns(group_by)
    _require(runs, n_col, size_col, acc_col, *groups)
    data = runs[groups].copy() if groups else pd.DataFrame(index=runs.index)
    data["n"], data["size"], data["acc"] = _numeric(runs[n_col]), _numeric(runs[size_col]), _numeric(runs[acc_col])
    data = data.dropna(subset=["n", "size", "acc"])
    data = data[data["size"] > 0]
    if data.empty:
        raise ValueError(f"No run has {n_col!r}, {size_col!r} and {acc_col!r} all set; nothing to plot.")
    data["bits"] = capacity.bits_per_param(data["n"], data["acc"], data["size"])
    data = data.groupby(groups + ["n", "size"], dropna=False, sort=True)["bits"].mean().reset_index()
    fig, ax = _figure()
    parts = _groups(data, group_by)
    for (label, part), color in zip(parts, _colors(len(parts))):
        part = part.sort_values("size")
        ax.plot(part["size"], part["bits"], "o", color=color, ms=5, label=label)
    ax.axhline(capacity.REPORTED_BITS_PER_PARAM, color="0.3", ls="--", lw=1.0,
               label=f"{_fmt(capacity.REPORTED_BITS_PER_PARAM)} bits/param (Allen-Zhu & Li)")
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(size_col)
    ax.set_ylabel(f"bits stored per parameter\n({capacity.bits_per_person():.1f} bits/person × {acc_col})")
    ax.set_title(title or "facts stored per parameter")
    ax.legend(title=_legend_title(group_by), fontsize="small")
    return _save(fig, out)
