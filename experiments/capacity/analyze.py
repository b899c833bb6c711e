"""Tables and figures of the capacity study, from its run folders.

    python experiments/capacity/analyze.py [--root runs/capacity] [--out experiments/capacity]

Writes into --out: `runs.csv` (one row per run, with the columns below), `results.md` (the
tables in markdown) and the figures
  contour_b10k.png, ...   per budget: bits stored per parameter over layers x heads
  bits_vs_params.png      bits stored vs parameters, every run, with the 1 and 2 bits/param lines
  threshold.png           smallest model recalling >= 95% vs facts: this study (bio, 200
                          exposures) beside the tool-vs-weights study's in-weight and in-tool runs
  curves.png              bits stored vs step, the best and worst shape of each budget
Columns added to the runs: budget, layers, heads, non_embedding_params, bits (eval/bio_bits),
bits_per_param, bits_per_non_embedding_param, recall (eval/bio_acc), facts_bits (all the facts hold).
"""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lmjax.models.budget import count_params
from lmjax.results import load_histories, load_runs
from lmjax.results.capacity import FACTS_PER_PERSON, REPORTED_BITS_PER_PARAM, bits_per_person
from lmjax.results.plots import DPI, _colors, plot_contour, plot_curves, plot_smallest_model

HERE = Path(__file__).resolve().parent
TOOL_VS_WEIGHTS = HERE.parent / "tool_vs_weights" / "runs.csv"
THRESHOLD = 0.95


def with_study_columns(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs[runs["status"] == "done"].copy()
    runs["budget"] = runs["shape"].str.extract(r"^b(\d+)k_")[0].astype(int) * 1000
    runs["layers"], runs["heads"] = runs["model.n_layers"].astype(int), runs["model.n_heads"].astype(int)
    runs["non_embedding_params"] = [
        count_params(dim=int(r["model.dim"]), n_layers=r["layers"], n_heads=r["heads"], n_kv_heads=int(r["model.n_kv_heads"]),
                     mlp_hidden=int(r["model.mlp_hidden"]), vocab_size=int(r["model.vocab_size"])).non_embedding_params
        for _, r in runs.iterrows()
    ]
    runs["bits"], runs["recall"] = runs["eval/bio_bits"], runs["eval/bio_acc"]
    runs["bits_per_param"] = runs["bits"] / runs["params"]
    runs["bits_per_non_embedding_param"] = runs["bits"] / runs["non_embedding_params"]
    runs["facts_bits"] = runs["data.num_people"] * bits_per_person()
    runs["facts"] = FACTS_PER_PERSON * runs["data.num_people"]
    return runs


def shape_runs(runs):
    """The shape sweep: per budget, the runs at the number of people with the most shapes (when
    there are several shapes)."""
    counts = runs.groupby(["budget", "data.num_people"])["shape"].nunique().reset_index()
    sweep = counts.sort_values("shape").groupby("budget").tail(1)
    sweep = sweep[sweep["shape"] > 1]
    return runs.merge(sweep[["budget", "data.num_people"]], on=["budget", "data.num_people"])


def per_shape(shapes: pd.DataFrame) -> pd.DataFrame:
    """Mean (and spread, where there are two seeds) of each shape's numbers."""
    agg = shapes.groupby(["budget", "layers", "heads"]).agg(
        people=("data.num_people", "first"), dim=("model.dim", "first"), mlp=("model.mlp_hidden", "first"), params=("params", "first"),
        non_embedding=("non_embedding_params", "first"), seeds=("seed", "nunique"),
        bits_per_param=("bits_per_param", "mean"), bpp_min=("bits_per_param", "min"), bpp_max=("bits_per_param", "max"),
        bits_per_non_embedding_param=("bits_per_non_embedding_param", "mean"), recall=("recall", "mean"),
    )
    return agg.reset_index()


def markdown_table(df: pd.DataFrame, formats: dict) -> str:
    header = "| " + " | ".join(formats) + " |\n|" + "---:|" * len(formats) + "\n"
    rows = []
    for _, row in df.iterrows():
        rows.append("| " + " | ".join(fmt(row) for fmt in formats.values()) + " |")
    return header + "\n".join(rows) + "\n"


SHAPE_COLUMNS = {
    "layers": lambda r: f"{r['layers']:.0f}", "heads": lambda r: f"{r['heads']:.0f}",
    "width": lambda r: f"{r['dim']:.0f}", "MLP": lambda r: f"{r['mlp']:.0f}",
    "params (non-emb.)": lambda r: f"{int(r['params']):,} ({int(r['non_embedding']):,})",
    "bits/param": lambda r: f"{r['bits_per_param']:.3f}" + (
        f" ({r['bpp_min']:.3f}–{r['bpp_max']:.3f})" if r["seeds"] > 1 else ""),
    "bits/non-emb. param": lambda r: f"{r['bits_per_non_embedding_param']:.3f}",
    "recall": lambda r: f"{r['recall']:.3f}", "seeds": lambda r: f"{r['seeds']:.0f}",
}


def plot_bits_vs_params(runs, out):
    """Bits stored vs parameters, one point per run: colour = layers, marker = heads."""
    fig = Figure(figsize=(7.2, 5.0), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, which="both", alpha=0.3)
    layers = sorted(runs["layers"].unique())
    colors = dict(zip(layers, _colors(len(layers))))  # any number of depths (the cluster grid has six)
    markers = {1: "o", 2: "s", 4: "^", 8: "D"}
    for (layers, heads), part in runs.groupby(["layers", "heads"]):
        ax.scatter(part["params"], part["bits"], color=colors[layers], marker=markers.get(heads, "x"), s=28,
                   label=f"{layers} layers, {heads} heads", alpha=0.85)
    span = np.array([runs["params"].min() * 0.8, runs["params"].max() * 1.25])
    for rate, style in ((REPORTED_BITS_PER_PARAM, "--"), (1.0, ":")):
        ax.plot(span, rate * span, style, color="0.3", lw=1.0, label=f"{rate:g} bit/param")
    for people in sorted(runs["data.num_people"].unique()):
        ax.axhline(people * bits_per_person(), color="0.6", lw=0.8)
        ax.annotate(f"all facts of {people} people", (span[0], people * bits_per_person()), fontsize="x-small",
                    va="bottom", color="0.4")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (embeddings included)")
    ax.set_ylabel("bits stored (eval/bio_bits)")
    ax.set_title("bits stored after 200 exposures a fact")
    ax.legend(fontsize="x-small", ncols=2, loc="upper left")
    fig.savefig(out, dpi=DPI)


def threshold_table(runs):
    """This study's scaling runs and the tool-vs-weights study's runs, on one recall column."""
    scaling = runs[(runs["layers"] == 2) & (runs["heads"] == 2)]
    parts = [pd.DataFrame({"setting": "in-weight, biographies, 200 exposures (this study)",
                           "people": scaling["data.num_people"], "params": scaling["params"],
                           "recall": scaling["recall"], "seed": scaling["seed"]})]
    if TOOL_VS_WEIGHTS.is_file():
        earlier = pd.read_csv(TOOL_VS_WEIGHTS)
        names = {"weights": "in-weight, questions, trained to 96% (tool vs weights)", "tool": "in-tool (tool vs weights)"}
        parts.append(pd.DataFrame({"setting": earlier["data.mode"].map(names), "people": earlier["data.num_people"],
                                   "params": earlier["params"], "recall": earlier["eval/qa_recall"],
                                   "seed": earlier["seed"]}))
    return pd.concat(parts, ignore_index=True)


def best_and_worst(shapes_mean: pd.DataFrame) -> dict:
    """budget -> (best shape row, worst shape row) by mean bits per parameter."""
    out = {}
    for budget, part in shapes_mean.groupby("budget"):
        ordered = part.sort_values("bits_per_param")
        out[budget] = (ordered.iloc[-1], ordered.iloc[0])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/capacity")
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    runs = with_study_columns(load_runs(args.root))
    runs.to_csv(out / "runs.csv", index=False)
    shapes = shape_runs(runs)
    means = per_shape(shapes)
    lines = [f"# Capacity study: results ({len(runs)} runs)\n"]
    for budget, part in means.groupby("budget"):
        people = int(part["people"].iloc[0])
        lines.append(f"\n## Budget ~{budget // 1000}k parameters, {people} people "
                     f"({people * bits_per_person():,.0f} bits of facts)\n\n")
        lines.append(markdown_table(part.sort_values("bits_per_param", ascending=False), SHAPE_COLUMNS))
        if part["bits_per_param"].max() == 0:
            lines.append("\nNo shape stores anything at this budget: no contour to draw.\n")
        elif part["layers"].nunique() > 1 and part["heads"].nunique() > 1:
            plot_contour(shapes[shapes["budget"] == budget], "layers", "heads", "bits_per_param",
                         out / f"contour_b{budget // 1000}k.png", log_x=True, log_y=True, levels=10,
                         title=f"~{budget // 1000}k parameters, {people} people: bits stored per parameter")
    for budget, part in means.groupby("budget"):
        twice = runs[(runs["budget"] == budget) & (runs["data.num_people"] == 2 * part["people"].iloc[0])]
        if len(twice):
            lines.append(f"\n## Budget ~{budget // 1000}k at twice the people ({2 * int(part['people'].iloc[0])}): "
                         "the shapes that stored (nearly) every fact above\n\n")
            lines.append(markdown_table(per_shape(twice).sort_values("bits_per_param", ascending=False), SHAPE_COLUMNS))
    extremes = best_and_worst(means)
    stored = {budget for budget, (best, _) in extremes.items() if best["bits_per_param"] > 0}
    lines.append("\n## Best and worst shape per budget\n\n| budget | best | worst | best / worst |\n|---|---|---|---:|\n")
    for budget, (best, worst) in extremes.items():
        if best["bits_per_param"] == 0:
            lines.append(f"| ~{budget // 1000}k | no shape stores anything | | |\n")
            continue
        lines.append(f"| ~{budget // 1000}k | {best['layers']:.0f} layers x {best['heads']:.0f} heads, width {best['dim']:.0f}: "
                     f"{best['bits_per_param']:.3f} | {worst['layers']:.0f} layers x {worst['heads']:.0f} heads, width "
                     f"{worst['dim']:.0f}: {worst['bits_per_param']:.3f} | {best['bits_per_param'] / worst['bits_per_param']:.2f} |\n")

    plot_bits_vs_params(runs, out / "bits_vs_params.png")
    threshold = threshold_table(runs)
    fits = plot_smallest_model(
        threshold, "people", "params", "recall", THRESHOLD, out / "threshold.png", group_by="setting",
        x_transform=lambda n: FACTS_PER_PERSON * n, reference_params_per_fact=(8,), xlabel="facts (4 per person)",
        ylabel="parameters of the smallest model", title=f"smallest model recalling ≥ {THRESHOLD:.0%} of the facts",
    )
    lines.append(f"\n## Smallest model recalling >= {THRESHOLD:.0%}\n\n| setting | points | params per fact (median) |\n|---|---:|---:|\n")
    for setting, fit in fits.items():
        lines.append(f"| {setting} | {fit['points']} | {fit['params_per_fact']:.0f} |\n")
    scaling = runs[(runs["layers"] == 2) & (runs["heads"] == 2)].sort_values(["data.num_people", "params"])
    lines.append("\n## Scaling runs (2 layers, 2 heads)\n\n")
    lines.append(markdown_table(scaling, {
        "people": lambda r: f"{r['data.num_people']}", "params": lambda r: f"{int(r['params']):,}",
        "width": lambda r: f"{r['model.dim']}", "recall": lambda r: f"{r['recall']:.3f}",
        "bits": lambda r: f"{r['bits']:,.0f}", "of the facts' bits": lambda r: f"{r['bits'] / r['facts_bits']:.2f}",
        "bits/param": lambda r: f"{r['bits_per_param']:.3f}",
    }))

    picked = {f"b{budget // 1000}k_L{int(row['layers'])}_H{int(row['heads'])}"
              for budget, pair in extremes.items() if budget in stored for row in pair}
    histories = load_histories(args.root, columns=["shape", "data.num_people", "seed"])
    histories = histories[histories["workdir"].isin(shapes["workdir"]) & histories["shape"].isin(picked)]
    plot_curves(histories, "eval/bio_bits", "shape", out / "curves.png",
                title="bits stored vs step, best and worst shape per budget (shape sweep)")
    lines.append(f"\nPublished (Allen-Zhu & Li): ~{REPORTED_BITS_PER_PARAM:g} bits/param after 1,000 exposures, ~1 after 100; "
                 "the original PyTorch work: ~7-9 parameters per fact in-weight.\n")
    (out / "results.md").write_text("".join(lines))
    print("".join(lines))


if __name__ == "__main__":
    main()
