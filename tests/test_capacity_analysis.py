"""experiments/capacity/analyze.py on hand-made run folders: the numbers it reports are the runs' own."""
import importlib.util
import json
import sys

import pandas as pd
import pytest

from conftest import ROOT
from lmjax.models.budget import count_params
from lmjax.results.capacity import bits_per_person


def load_analysis():
    spec = importlib.util.spec_from_file_location("capacity_analyze", ROOT / "experiments" / "capacity" / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(root, shape, people, seed, dim, layers, heads, mlp, bits, acc):
    workdir = root / f"shape={shape},num_people={people},seed={seed}"
    workdir.mkdir(parents=True)
    model = dict(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads, mlp_hidden=mlp, vocab_size=260)
    (workdir / "config.json").write_text(json.dumps({"seed": seed, "model": model, "data": {"num_people": people}}))
    (workdir / "grid.json").write_text(json.dumps({"grid": "capacity", "labels": {
        "shape": shape, "data.num_people": people, "seed": seed}}))
    params = count_params(dim=dim, n_layers=layers, n_heads=heads, mlp_hidden=mlp, vocab_size=260).params
    rows = [{"step": step, "eval/bio_bits": bits * step / 100, "eval/bio_acc": acc * step / 100,
             "time/since_start_s": step / 10} for step in (50, 100)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (workdir / "summary.json").write_text(json.dumps({"step": 100, "interrupted": False, "params": params,
                                                      "eval/bio_bits": bits, "eval/bio_acc": acc,
                                                      "time/since_start_s": 10.0}))
    return params


def test_analysis_reports_each_budgets_best_and_worst_shape(tmp_path, monkeypatch):
    root, out = tmp_path / "runs", tmp_path / "out"
    facts = 256 * bits_per_person()
    # ~20k budget: 1 layer beats 2, which beats 4 (seed 1 of the 1-layer shape agrees).
    p1 = write_run(root, "b20k_L1_H1", 256, 0, 22, 1, 1, 99, 0.30 * facts, 0.3)
    write_run(root, "b20k_L1_H1", 256, 1, 22, 1, 1, 99, 0.20 * facts, 0.2)
    write_run(root, "b20k_L2_H2", 256, 0, 20, 2, 2, 52, 0.15 * facts, 0.1)
    write_run(root, "b20k_L4_H1", 256, 0, 14, 4, 1, 56, 0.10 * facts, 0.05)
    write_run(root, "b20k_L4_H2", 256, 0, 12, 4, 2, 79, 0.12 * facts, 0.06)
    # The scaling part: only the 2-layer shape, at other numbers of people.
    write_run(root, "b20k_L2_H2", 128, 0, 20, 2, 2, 52, 0.96 * facts / 2, 0.96)
    write_run(root, "b20k_L2_H2", 512, 0, 20, 2, 2, 52, 0.05 * facts * 2, 0.05)
    analysis = load_analysis()
    monkeypatch.setattr(analysis, "TOOL_VS_WEIGHTS", tmp_path / "absent.csv")  # this study's runs only
    monkeypatch.setattr(sys, "argv", ["analyze.py", "--root", str(root), "--out", str(out)])
    analysis.main()
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 7
    one_layer = runs[(runs["shape"] == "b20k_L1_H1") & (runs["seed"] == 0)].iloc[0]
    assert one_layer["bits_per_param"] == pytest.approx(0.30 * facts / p1)
    report = (out / "results.md").read_text()
    best = (0.30 + 0.20) / 2 * facts / p1
    assert f"1 layers x 1 heads, width 22: {best:.3f}" in report
    assert "4 layers x 1 heads, width 14" in report.split("## Best and worst")[1].split("\n\n##")[0]
    assert "## Budget ~20k parameters, 256 people" in report  # the sweep is at 256, not 128 or 512
    for figure in ("contour_b20k.png", "bits_vs_params.png", "threshold.png", "curves.png"):
        assert (out / figure).stat().st_size > 10_000, figure
