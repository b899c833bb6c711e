"""lmjax.results on synthetic run folders written by the tests (no training)."""
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from lmjax.data import facts
from lmjax.results import capacity
from lmjax.results.load import find_runs, first_reaching, load_histories, load_runs, step_reaching
from lmjax.results.plots import (
    fit_power_law, plot_bits_per_param, plot_contour, plot_curves, plot_smallest_model, smallest_model_reaching,
)

from conftest import ROOT


def write_run(folder, config, lines=(), summary=None, grid=None, tail=""):
    """A run folder as lmjax.main leaves it: config.json, metrics.jsonl (+ a raw tail), summary, grid."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if grid is not None:
        (folder / "grid.json").write_text(json.dumps(grid))
    return folder


def facts_config(num_people=64, mode="weights", dim=32, seed=0):
    return {"seed": seed, "model": {"dim": dim, "n_layers": 2}, "data": {"num_people": num_people, "mode": mode},
            "train": {"steps": 100, "stop_when": "eval/qa_acc>=0.96"}, "layers": [1, 2]}


HISTORY = [
    {"step": 0, "model/params": 1234},
    {"step": 0, "train/loss": 5.0},
    {"step": 10, "train/loss": 3.0},
    {"step": 10, "eval/qa_acc": 0.5, "eval/qa_loss": 2.0, "time/since_start_s": 10.0},
    {"step": 20, "train/loss": 2.0},
    {"step": 20, "eval/qa_acc": 0.9, "eval/qa_loss": 1.0, "time/since_start_s": 20.0},
    {"step": 30, "train/loss": "nan"},
    {"step": 30, "eval/qa_acc": 0.8, "eval/qa_loss": 1.5, "time/since_start_s": 30.0},
]


@pytest.fixture
def grid_folder(tmp_path):
    """A finished run with a summary and grid labels, and a running one with a half-written last line."""
    root = tmp_path / "grid"
    write_run(root / "done", facts_config(), HISTORY,
              summary={"step": 30, "interrupted": False, "stopped_early": False, "params": 1234,
                       "seconds_since_start": 31.5, "train/loss": "nan", "eval/qa_acc": 0.8, "eval/qa_loss": 1.5},
              grid={"grid": "g", "labels": {"data.num_people": 64, "mode": "weights", "step": 3}, "overrides": {}})
    write_run(root / "nested" / "running", facts_config(mode="tool", seed=1), HISTORY[:4],
              tail='{"step": 20, "train/lo')
    (root / "nested" / "running" / "checkpoints").mkdir()
    (root / "nested" / "running" / "checkpoints" / "config.json").write_text("{}")  # inside a run: not a run
    return root


# ----------------------------------------------------------------------------- load


def test_find_runs_recurses_globs_dedups_and_stops_inside_a_run(grid_folder):
    done, running = grid_folder / "done", grid_folder / "nested" / "running"
    assert find_runs(grid_folder) == [done.resolve(), running.resolve()]
    assert find_runs(done, grid_folder / "*", str(grid_folder / "do*")) == [done.resolve(), running.resolve()]


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_runs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No runs in .*empty.*config.json"):
        load_runs(tmp_path / "empty")
    with pytest.raises(ValueError, match="No runs"):
        find_runs(str(tmp_path / "nothing-*"))


def test_load_runs_columns_values_labels_and_status(grid_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the half-written LAST line of a running run is expected: no warning
        table = load_runs(grid_folder)
    assert list(table.columns[:5]) == ["workdir", "name", "status", "step", "params"]
    runs = table.set_index("name")
    done, running = runs.loc["done"], runs.loc["running"]
    # config flattened with dotted names, lists as tuples
    assert done["model.dim"] == 32 and done["data.mode"] == "weights" and done["seed"] == 0
    assert done["train.stop_when"] == "eval/qa_acc>=0.96" and done["layers"] == (1, 2)
    assert running["data.mode"] == "tool" and running["seed"] == 1
    # grid labels: config keys stay config columns, others get a column, clashing ones a grid. prefix
    assert done["grid"] == "g" and done["mode"] == "weights" and done["grid.step"] == 3
    assert "grid.data.num_people" not in runs and pd.isna(running["mode"])
    # status, final and best metrics
    assert done["status"] == "done" and running["status"] == "incomplete"
    assert done["step"] == 30 and running["step"] == 10  # the half-written step-20 line is skipped
    assert done["params"] == 1234 and running["params"] == 1234  # summary / model/params
    assert done["eval/qa_acc"] == 0.8 and done["best/eval/qa_acc"] == 0.9
    assert done["eval/qa_loss"] == 1.5 and done["best/eval/qa_loss"] == 1.0
    assert math.isnan(done["train/loss"]) and done["seconds_since_start"] == 31.5
    assert running["eval/qa_acc"] == 0.5 and running["train/loss"] == 3.0 and pd.isna(running["seconds_since_start"])
    assert "best/train/loss" not in runs


def test_missing_files_give_nans_and_stale_summary_is_ignored(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"seed": 3}))  # no metrics.jsonl, no summary
    resumed = write_run(tmp_path / "resumed", {"seed": 4}, [{"step": 5, "eval/qa_acc": 0.1}, {"step": 9, "eval/qa_acc": 0.2}],
                        summary={"step": 5, "interrupted": True, "params": 7, "eval/qa_acc": 0.1})
    interrupted = write_run(tmp_path / "interrupted", {"seed": 5}, [{"step": 5, "eval/qa_acc": 0.1}],
                            summary={"step": 5, "interrupted": True, "params": 7, "eval/qa_acc": 0.1})
    runs = load_runs(bare, resumed, interrupted).set_index("name")
    assert runs.loc["bare", "status"] == "incomplete" and pd.isna(runs.loc["bare", "eval/qa_acc"])
    assert pd.isna(runs.loc["bare", "step"]) and runs.loc["bare", "seed"] == 3
    assert runs.loc["resumed", "status"] == "incomplete" and runs.loc["resumed", "eval/qa_acc"] == 0.2
    assert runs.loc["interrupted", "status"] == "interrupted" and runs.loc["interrupted", "params"] == 7
    hist = load_histories(bare, resumed)
    assert list(hist["name"]) == ["resumed", "resumed"]


def test_load_histories_merges_steps_and_attaches_columns(grid_folder):
    hist = load_histories(grid_folder)
    done = hist[hist["name"] == "done"].set_index("step")
    assert list(done.index) == [0, 10, 20, 30]  # 8 lines, 4 steps
    assert done.loc[0, "model/params"] == 1234 and done.loc[0, "train/loss"] == 5.0
    assert done.loc[20, "train/loss"] == 2.0 and done.loc[20, "eval/qa_acc"] == 0.9
    assert math.isnan(done.loc[30, "train/loss"])  # "nan" logged as a string
    assert (done["data.mode"] == "weights").all() and (done["mode"] == "weights").all()
    running = hist[hist["name"] == "running"]
    assert list(running["step"]) == [0, 10] and (running["data.mode"] == "tool").all()
    light = load_histories(grid_folder, columns=["data.mode", "params", "status"])
    assert {"data.mode", "params", "status"} <= set(light.columns) and "model.dim" not in light
    assert set(light["status"]) == {"done", "incomplete"}
    with pytest.raises(ValueError, match="logged metric"):
        load_histories(grid_folder, columns=["eval/qa_acc"])


def test_first_reaching_matches_a_hand_computed_answer(grid_folder):
    hist = load_histories(grid_folder, columns=[])
    by_name = first_reaching(hist, "eval/qa_acc", 0.85, by="name")
    assert by_name.loc["done", "step"] == 20 and by_name.loc["done", "time/since_start_s"] == 20.0
    assert math.isnan(by_name.loc["running", "step"]) and math.isnan(by_name.loc["running", "time/since_start_s"])
    # loss-like: reaching means <= threshold; train/loss <= 2.5 first at step 20, time interpolated 10 -> 20
    loss = first_reaching(hist, "train/loss", 2.5, by="name")
    assert loss.loc["done", "step"] == 20 and loss.loc["done", "time/since_start_s"] == 20.0
    loss = first_reaching(hist, "train/loss", 4.0, by="name")
    assert loss.loc["done", "step"] == 10
    assert list(first_reaching(hist, "eval/qa_acc", 0.4).index) == sorted(hist["workdir"].unique())
    one = hist[hist["name"] == "done"]
    assert step_reaching(one, "eval/qa_acc", 0.5) == 10 and math.isnan(step_reaching(one, "eval/qa_acc", 0.95))
    assert step_reaching(one, "eval/qa_loss", 1.2, higher=True) == 10
    with pytest.raises(ValueError, match="No run logged 'eval/nope'"):
        first_reaching(hist, "eval/nope", 0.5)
    # a train/ metric between evals: time linear in step
    mid = pd.DataFrame({"step": [0, 5, 10], "train/loss": [3.0, 1.0, 0.5], "time/since_start_s": [0.0, np.nan, 8.0]})
    mid["workdir"] = "w"
    assert first_reaching(mid, "train/loss", 1.5).loc["w", "time/since_start_s"] == pytest.approx(4.0)


# ----------------------------------------------------------------------------- capacity


def test_capacity_bits_against_hand_count():
    days, months, years = facts.MAX_DAY, len(facts.MONTHS), facts.LAST_YEAR - facts.FIRST_YEAR + 1
    assert (days, months, years) == (28, 12, 51)  # as the design states: day 1-28, month 1-12, 1950-2000
    expected = (math.log2(days * months * years) + math.log2(len(facts.COUNTRIES)) + math.log2(len(facts.CITIES))
                + math.log2(len(facts.OCCUPATIONS)))
    assert capacity.bits_per_person() == pytest.approx(expected, rel=1e-12)
    assert capacity.attribute_bits()["birth_place"] == pytest.approx(math.log2(len(facts.COUNTRIES)))
    assert capacity.facts_bits(256) == pytest.approx(256 * expected)
    assert capacity.facts_bits(256, 0.5) == pytest.approx(128 * expected)
    assert capacity.bits_per_param(256, 0.5, 1000) == pytest.approx(128 * expected / 1000)
    series = capacity.bits_per_param(pd.Series([100, 200]), pd.Series([1.0, 0.5]), pd.Series([10, 10]))
    np.testing.assert_allclose(series, [10 * expected, 10 * expected])


# ----------------------------------------------------------------------------- smallest model


SIZES = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def scaling_runs(c=8.0, p=1.0, seeds=(0,)):
    """In-weight: a run reaches exactly when size >= c * N**p; in-tool: when size >= 64 whatever N."""
    rows = []
    for n in (4, 16, 64, 256):
        for size in SIZES:
            for seed in seeds:
                rows.append({"data.num_people": n, "params": size, "seed": seed, "data.mode": "weights",
                             "acc": 1.0 if size >= c * n ** p else 0.2})
                rows.append({"data.num_people": n, "params": size, "seed": seed, "data.mode": "tool",
                             "acc": 0.99 if size >= 64 else 0.1})
    return pd.DataFrame(rows)


def test_stored_bits_known_answers():
    """Uniform guessing stores nothing, a perfect model stores every bit, worse than uniform is 0."""
    bits = math.log2(30)  # 30 countries
    uniform_loss = 100 * math.log(30)  # 100 facts, each at -ln(1/30) nats
    assert capacity.stored_bits(100, bits, uniform_loss) == pytest.approx(0.0, abs=1e-9)
    assert capacity.stored_bits(100, bits, 0.0) == pytest.approx(100 * bits)
    assert capacity.stored_bits(100, bits, 2 * uniform_loss) == 0.0
    # Half the facts known exactly, the other half guessed uniformly: half the bits.
    assert capacity.stored_bits(100, bits, 50 * math.log(30)) == pytest.approx(50 * bits)
    # Narrowed to 2 candidates out of 30 for every fact: log2(30) - 1 bits each.
    assert capacity.stored_bits(100, bits, 100 * math.log(2)) == pytest.approx(100 * (bits - 1))


def test_fit_power_law_recovers_exponent():
    x = np.array([4.0, 16, 64, 256])
    slope, intercept = fit_power_law(x, 8 * x ** 1.0)
    assert slope == pytest.approx(1.0, abs=1e-6) and 10 ** intercept == pytest.approx(8.0, rel=1e-6)
    slope, _ = fit_power_law(x, 3 * x ** 0.5)
    assert slope == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="two distinct"):
        fit_power_law([4.0, 4.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1.0, 2.0], [0.0, 2.0])


def test_smallest_model_reaching_and_fit(tmp_path):
    runs = scaling_runs()
    table = smallest_model_reaching(runs, "data.num_people", "params", "acc", 0.95, group_by="data.mode")
    weights = table[table["data.mode"] == "weights"]
    assert list(weights["data.num_people"]) == [4, 16, 64, 256]
    assert list(weights["params"]) == [32, 128, 512, 2048]  # exactly 8 * N
    assert list(table[table["data.mode"] == "tool"]["params"]) == [64, 64, 64, 64]
    fits = plot_smallest_model(runs, "data.num_people", "params", "acc", 0.95, tmp_path / "s.png",
                               group_by="data.mode", reference_params_per_fact=(8,))
    assert fits["weights"]["slope"] == pytest.approx(1.0, abs=1e-6)
    assert 10 ** fits["weights"]["intercept"] == pytest.approx(8.0, rel=1e-6)
    assert fits["weights"]["params_per_fact"] == 8.0
    assert fits["tool"]["slope"] == pytest.approx(0.0, abs=1e-6)
    assert_png(tmp_path / "s.png")
    # x_transform: count facts (4 a person) -> 2 params per fact
    fits = plot_smallest_model(runs, "data.num_people", "params", "acc", 0.95, tmp_path / "f.png",
                               group_by="data.mode", x_transform=lambda n: capacity.FACTS_PER_PERSON * n)
    assert fits["weights"]["params_per_fact"] == 2.0 and fits["weights"]["slope"] == pytest.approx(1.0, abs=1e-6)


def test_smallest_model_seed_rules(tmp_path):
    # N=16, size 128 (= 8 N): seed 0 reaches with 1.0; seed 1 misses with 0.88; seed 2 reaches with 1.0
    runs = scaling_runs(seeds=(0, 1, 2))
    runs = runs[runs["data.mode"] == "weights"].drop(columns="data.mode")
    miss = (runs["data.num_people"] == 16) & (runs["params"] == 128) & (runs["seed"] == 1)
    runs.loc[miss, "acc"] = 0.88

    def smallest(rule, frame=runs):
        table = smallest_model_reaching(frame, "data.num_people", "params", "acc", 0.95, rule=rule)
        return dict(zip(table["data.num_people"], table["params"]))

    assert smallest("majority")[16] == 128  # 2 of 3 reach
    assert smallest("mean")[16] == 128  # mean (1 + 0.88 + 1) / 3 = 0.96 >= 0.95
    assert smallest("all")[16] == 256
    assert smallest("any")[16] == 128
    two = runs[runs["seed"] < 2]  # 1 of 2 is not a strict majority; mean 0.94 misses too
    assert smallest("majority", two)[16] == 256 and smallest("mean", two)[16] == 256
    assert smallest("any", two)[16] == 128
    # a crashed seed (NaN) counts as not reaching, and is left out of the mean
    runs.loc[runs["seed"] == 2, "acc"] = np.nan
    runs.loc[miss, "acc"] = 0.92
    assert smallest("majority")[16] == 256  # 1 of 3 reaches
    assert smallest("mean")[16] == 128  # mean (1 + 0.92) / 2 = 0.96
    with pytest.raises(ValueError, match="Unknown rule"):
        smallest("median")
    # one group with a single N: points but no fit
    fits = plot_smallest_model(runs[runs["data.num_people"] == 4], "data.num_people", "params", "acc", 0.95,
                               tmp_path / "one.png")
    assert math.isnan(fits["all"]["slope"]) and fits["all"]["params_per_fact"] == 8.0 and fits["all"]["points"] == 1


# ----------------------------------------------------------------------------- plots


def assert_png(path, min_bytes=5000):
    assert path.is_file() and path.stat().st_size > min_bytes, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200 and image.shape[2] in (3, 4)


def test_plot_curves_groups_seeds_and_time_axis(tmp_path):
    rng = np.random.default_rng(0)
    for mode in ("weights", "tool"):
        for seed in range(3):
            lines = [{"step": s, "eval/qa_acc": 1 - np.exp(-s / (30 if mode == "tool" else 60)) + 0.02 * rng.normal(),
                      "time/since_start_s": 0.5 * s + seed} for s in range(0, 200 - 30 * seed, 10)]
            lines += [{"step": s, "train/loss": 3 * np.exp(-s / 50)} for s in range(0, 200, 5)]
            write_run(tmp_path / "runs" / f"{mode}-{seed}", facts_config(mode=mode, seed=seed), lines)
    hist = load_histories(tmp_path / "runs", columns=["data.mode", "seed"])
    assert_png(plot_curves(hist, "eval/qa_acc", "data.mode", tmp_path / "p" / "acc.png"))
    assert_png(plot_curves(hist, "train/loss", ["data.mode", "seed"], tmp_path / "loss.png",
                           x="time/since_start_s", smooth=0.6, aggregate="median", log_y=True))
    assert_png(plot_curves(hist[hist["seed"] == 0], "eval/qa_acc", None, tmp_path / "one.png"))
    with pytest.raises(ValueError, match="No column 'data.nope'"):
        plot_curves(hist, "eval/qa_acc", "data.nope", tmp_path / "x.png")


def test_plot_contour_grid_and_scattered(tmp_path):
    rows = [{"model.dim": d, "data.num_people": n, "seed": s, "acc": min(1.0, d * d / (40.0 * n)) - 0.01 * s}
            for d in (16, 32, 64, 128) for n in (16, 64, 256, 1024) for s in (0, 1)]
    runs = pd.DataFrame(rows)
    assert_png(plot_contour(runs, "model.dim", "data.num_people", "acc", tmp_path / "grid.png", log_x=True, log_y=True))
    scattered = runs.drop(index=runs.index[(runs["model.dim"] == 128) & (runs["data.num_people"] == 16)])
    assert_png(plot_contour(scattered, "model.dim", "data.num_people", "acc", tmp_path / "tri.png",
                            levels=[0.2, 0.5, 0.8, 0.95], log_x=True, log_y=True))
    with pytest.raises(ValueError, match="at least two values"):
        plot_contour(runs[runs["model.dim"] == 16], "model.dim", "data.num_people", "acc", tmp_path / "x.png")


def test_plot_bits_per_param(tmp_path):
    runs = scaling_runs(seeds=(0, 1))
    out = plot_bits_per_param(runs[runs["acc"] > 0.9], "data.num_people", "params", "acc", tmp_path / "bits.png",
                              group_by="data.mode")
    assert_png(out)


def test_cli_writes_csv_and_plot(grid_folder, tmp_path, subprocess_env):
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "lmjax.results", str(grid_folder), "--out", str(out), "--group_by", "data.mode"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(out / "runs.csv")) == 2
    assert_png(out / "curves.png")
    bad = subprocess.run(cmd[:-2] + ["--metric", "eval/nope"], capture_output=True, text=True, env=subprocess_env,
                         cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "No run logged 'eval/nope'" in bad.stderr and "Traceback" not in bad.stderr
