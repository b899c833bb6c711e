"""Run-level monitoring: the profilers (none | trace | light), FLOPs and MFU in the metrics, the
probes cadence, and their config errors."""
import json

import pytest

from conftest import tiny_facts_config
from lmjax.registry import ConfigError
from lmjax.train.loop import train


def rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 17-20 s on two cores: in the slow run, which CI runs too
def test_light_profile_flops_and_probes_are_logged(tmp_path):
    config = tiny_facts_config(**{"implementation.profiler": "light", "logging.probes_every": 4})
    train(config, tmp_path)
    logged = rows(tmp_path)
    start = next(r for r in logged if "perf/flops_per_step" in r)
    assert start["step"] == 0
    assert start["perf/flops_per_token"] == pytest.approx(start["perf/flops_per_step"] / (4 * 96))
    # Analytic matmuls only: below XLA's count, within the elementwise share of a d=32 model.
    assert 0.7 * start["perf/flops_per_step"] < start["perf/flops_per_step_analytic"] < start["perf/flops_per_step"]
    for r in (r for r in logged if "train/step_time_s" in r):
        assert r["perf/compute_s"] > 0
        # The three parts add up to the window's step time (host is the remainder, floored at 0).
        parts = r["perf/data_wait_s"] + r["perf/compute_s"] + r["perf/host_s"]
        assert parts == pytest.approx(r["train/step_time_s"], rel=1e-6) or r["perf/host_s"] == 0
        assert r["perf/flops_per_s"] == pytest.approx(start["perf/flops_per_step"] / r["train/step_time_s"])
        assert r["perf/mfu"] == pytest.approx(r["perf/flops_per_s"] / start["perf/flops_limit"])
        assert 0 < r["perf/mfu"] < 1
    details = json.loads((tmp_path / "step_cost.json").read_text())
    assert details["flops_source"] == "compiled" and details["perf/flops_per_step"] == start["perf/flops_per_step"]
    probed = sorted({r["step"] for r in logged if any(k.startswith("probe/") for k in r)})
    assert probed == [4, 8, 12]


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_trace_profile_writes_a_trace_of_the_chosen_steps(tmp_path):
    config = tiny_facts_config(**{
        "implementation.profiler": "trace", "logging.profile_start": 2, "logging.profile_stop": 4, "train.steps": 6,
    })
    train(config, tmp_path)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


@pytest.mark.parametrize("overrides,message", [
    ({"implementation.profiler": "perfetto"}, "choose one of: light, none, trace"),
    ({"logging.profile_start": 5, "logging.profile_stop": 5}, "start < stop"),
    ({"logging.probes_every": -1}, "logging.probes_every"),
])
def test_monitoring_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_facts_config(**overrides)
