"""Plots and numbers of the tool-vs-weights study, from its run folders.

    python experiments/tool_vs_weights/analyze.py [--root runs/tool_vs_weights] [--out experiments/tool_vs_weights]

Writes into --out: `runs.csv` (one row per run), `results.md` (the per-run table and the fits,
in markdown), and the figures `smallest_model.png` (smallest model reaching 95% recall vs the
number of facts, log-log, one fitted power law per mode), `curves.png` (teacher-forced accuracy
vs step for the largest N), `steps_to_learn.png` (steps until teacher-forced accuracy first
reaches 95%, vs the number of facts, per mode and width), `contour_weights.png` /
`contour_tool.png` (recall over people x width) and `bits_per_param.png` (in-weight: bits of
facts recalled per parameter).
"""
import argparse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lmjax.results import first_reaching, load_histories, load_runs
from lmjax.results.capacity import FACTS_PER_PERSON, bits_per_param
from lmjax.results.plots import DPI, plot_bits_per_param, plot_contour, plot_curves, plot_smallest_model

HERE = Path(__file__).resolve().parent
METRIC, THRESHOLD = "eval/qa_recall", 0.95
ORIGINAL = "~7-9 parameters per fact in-weight, a flat ~25k parameters in-tool (the original PyTorch work)"


def _table(runs):
    columns = {
        "data.mode": "mode", "data.num_people": "people", "model.dim": "width", "params": "params", "seed": "seed",
        "step": "steps", "eval/qa_acc": "qa_acc", METRIC: "recall", "eval/qa_unseen_recall": "unseen recall",
        "seconds_since_start": "seconds",
    }
    shown = runs[[c for c in columns if c in runs]].rename(columns=columns)
    shown = shown.sort_values(["mode", "people", "width", "seed"]).reset_index(drop=True)
    header = "| " + " | ".join(shown.columns) + " |\n|" + "---:|" * len(shown.columns) + "\n"
    lines = []
    for _, row in shown.iterrows():
        cells = []
        for name, value in row.items():
            if isinstance(value, float) and np.isnan(value):
                cells.append("–")
            elif name in ("qa_acc", "recall", "unseen recall"):
                cells.append(f"{value:.3f}")
            elif name in ("params", "people", "width", "seed", "steps", "seconds"):
                cells.append(f"{int(round(value)):,}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return header + "\n".join(lines) + "\n"


def plot_steps_to_learn(runs, histories, out):
    """Steps until eval/qa_acc first reaches 95%, vs facts: what learning costs as N grows.

    One line per (mode, width), the mean over seeds; an N where some seed never reaches it has no
    point.
    """
    reached = first_reaching(histories, "eval/qa_acc", THRESHOLD)["step"]
    runs = runs.assign(learn_step=runs["workdir"].map(reached))
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.35)
    for (mode, width), part in runs.groupby(["data.mode", "model.dim"]):
        per_n = part.groupby("facts")["learn_step"].agg(lambda s: s.mean() if s.notna().all() else np.nan).dropna()
        if len(per_n):
            ax.plot(per_n.index, per_n.values, "o-" if mode == "weights" else "s--", label=f"{mode}, width {width}")
    ax.set_xscale("log")
    ax.set_xticks(sorted(runs["facts"].unique()), [f"{n:,}" for n in sorted(runs["facts"].unique())])
    ax.set_xlabel("facts (4 per person)")
    ax.set_ylabel(f"steps until eval/qa_acc >= {THRESHOLD}")
    ax.set_title("training steps to learn the facts (32 packed rows a step)")
    ax.legend(fontsize="small", ncols=2)
    fig.savefig(out, dpi=DPI)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/tool_vs_weights")
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    runs = load_runs(args.root)
    runs["facts"] = FACTS_PER_PERSON * runs["data.num_people"]
    runs.to_csv(out / "runs.csv", index=False)
    fits = plot_smallest_model(
        runs, "data.num_people", "params", METRIC, THRESHOLD, out / "smallest_model.png", group_by="data.mode",
        x_transform=lambda n: FACTS_PER_PERSON * n, reference_params_per_fact=(8,), xlabel="facts (4 per person)",
        ylabel="parameters of the smallest model", title=f"smallest model with recall ≥ {THRESHOLD:.0%}",
    )
    largest = runs["data.num_people"].max()
    histories = load_histories(args.root, columns=["data.mode", "data.num_people", "model.dim", "seed"])
    plot_curves(histories[histories["data.num_people"] == largest], "eval/qa_acc", ["data.mode", "model.dim"],
                out / "curves.png", title=f"teacher-forced answer accuracy, {largest} people")
    plot_steps_to_learn(runs, histories, out / "steps_to_learn.png")
    for mode in sorted(runs["data.mode"].unique()):
        of_mode = runs[runs["data.mode"] == mode]
        if of_mode["data.num_people"].nunique() > 1 and of_mode["model.dim"].nunique() > 1:
            plot_contour(of_mode, "data.num_people", "model.dim", METRIC, out / f"contour_{mode}.png", log_x=True,
                         log_y=True, title=f"{mode}: recall by people x width (mean over seeds)")
    weights = runs[runs["data.mode"] == "weights"]
    plot_bits_per_param(weights, "data.num_people", "params", METRIC, out / "bits_per_param.png",
                        group_by="data.num_people", log_y=True, title="in-weight: bits of recalled facts per parameter")

    lines = [f"# Tool vs weights: results ({len(runs)} runs)\n", _table(runs), "\n## Smallest model reaching "
             f"{METRIC} >= {THRESHOLD} (majority of seeds)\n", "| mode | points | slope (params ∝ facts^slope) | "
             "params per fact (median) |\n|---|---:|---:|---:|\n"]
    for mode, fit in fits.items():
        lines.append(f"| {mode} | {fit['points']} | {fit['slope']:.2f} | {fit['params_per_fact']:.0f} |\n")
    best = weights.assign(bits=bits_per_param(weights["data.num_people"], weights[METRIC], weights["params"]))
    lines.append(f"\nIn-weight bits per parameter: max {best['bits'].max():.3f} "
                 f"(people {int(best.loc[best['bits'].idxmax(), 'data.num_people'])}, "
                 f"{int(best.loc[best['bits'].idxmax(), 'params']):,} params).\n")
    lines.append(f"\nFor comparison: {ORIGINAL}.\n")
    (out / "results.md").write_text("".join(lines))
    print("".join(lines))


if __name__ == "__main__":
    main()
