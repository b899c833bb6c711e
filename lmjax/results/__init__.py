"""Results of many runs: run folders -> pandas DataFrames -> matplotlib plots.

    from lmjax.results import load_runs, load_histories, plot_curves
    runs = load_runs("runs/grid-facts")            # one row per run
    hist = load_histories("runs/grid-facts")       # one row per (run, step)
    plot_curves(hist, "eval/qa_acc", "data.mode", "plots/acc.png")

    python -m lmjax.results runs/grid-facts --out plots/ --metric eval/qa_acc --group_by data.mode
"""
from lmjax.results.capacity import bits_per_param, bits_per_person, facts_bits
from lmjax.results.load import (
    find_runs, first_reaching, higher_is_better, load_histories, load_runs, step_reaching,
)
from lmjax.results.plots import (
    fit_power_law, plot_bits_per_param, plot_contour, plot_curves, plot_smallest_model, smallest_model_reaching,
)

__all__ = [
    "bits_per_param", "bits_per_person", "facts_bits",
    "find_runs", "first_reaching", "higher_is_better", "load_histories", "load_runs", "step_reaching",
    "fit_power_law", "plot_bits_per_param", "plot_contour", "plot_curves", "plot_smallest_model",
    "smallest_model_reaching",
]
