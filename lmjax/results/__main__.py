"""python -m lmjax.results RUNS... --out DIR [--metric eval/qa_acc] [--group_by data.mode] [--x step]

Writes DIR/runs.csv (one row per run, `load_runs`) and DIR/curves.png (`plot_curves` of the
metric, one colour per value of --group_by), and prints a short table of the runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

from lmjax import cli


def parse_args(argv):
    parser = cli.ArgumentParser(prog="lmjax.results", description=__doc__.split("\n\n")[1])
    parser.add_argument("runs", nargs="+", help="run folders, folders of runs, or glob patterns")
    parser.add_argument("--out", required=True, help="folder for runs.csv and curves.png")
    parser.add_argument("--metric", default="eval/qa_acc", help="metric to plot (default: eval/qa_acc)")
    parser.add_argument("--group_by", default=None, help="column that picks a curve's colour, e.g. data.mode")
    parser.add_argument("--x", default="step", help="x axis: step or time/since_start_s")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return cli.run("lmjax.results", parse_args, _results, argv)


def _results(args) -> int:
    from lmjax.results.load import load_histories, load_runs
    from lmjax.results.plots import plot_curves

    out = Path(args.out)
    if not 0.0 <= args.smooth < 1.0:
        raise ValueError(f"--smooth must lie in [0, 1) (an EMA weight; 0 = none), got {args.smooth!r}.")
    runs = load_runs(*args.runs)
    columns = [args.group_by] if args.group_by else []
    if args.group_by and args.group_by not in runs.columns:
        raise ValueError(f"No column {args.group_by!r} to group by; try one of: "
                         f"{', '.join(c for c in runs.columns if '/' not in c)}.")
    histories = load_histories(*args.runs, columns=columns)
    if args.metric not in histories.columns:
        metrics = sorted(c for c in histories.columns if "/" in c)
        raise ValueError(f"No run logged {args.metric!r}; logged metrics: {', '.join(metrics) or 'none'}.")
    if args.x != "step" and args.x not in histories.columns:
        times = sorted(c for c in histories.columns if c.startswith("time/"))
        raise ValueError(f"--x must be step or a logged metric (time/since_start_s: wall time), got {args.x!r}; "
                         f"logged times: {', '.join(times) or 'none'}.")
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    plot = plot_curves(histories, args.metric, args.group_by, out / "curves.png", x=args.x, smooth=args.smooth)
    shown = [c for c in ("name", "status", "step", "params", args.group_by, args.metric) if c and c in runs]
    print(runs[shown].to_string(index=False))
    print(f"wrote {out / 'runs.csv'} ({len(runs)} runs) and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
