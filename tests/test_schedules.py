import math

import numpy as np
import pytest

from lmjax.train.schedules import SCHEDULES, make_schedule


def reference(name, step, peak=1.0, warmup=10, total=100, min_ratio=0.1, decay_fraction=0.2):
    """Hand-written piecewise formulas, independent of the jnp implementation."""
    w = min(1.0, (step + 1) / warmup)
    p = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
    if name == "constant":
        return peak * w
    if name == "cosine":
        return peak * w * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
    if name == "linear":
        return peak * w * (1 - (1 - min_ratio) * p)
    if name == "wsd":
        decay_steps = round(decay_fraction * total)
        q = min(max((step - (total - decay_steps)) / decay_steps, 0.0), 1.0)
        return peak * w * (1 - (1 - min_ratio) * q)
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_matches_formula(name):
    fn = make_schedule(name, peak=1.0, warmup_steps=10, total_steps=100, min_ratio=0.1, decay_fraction=0.2)
    for step in [0, 1, 5, 9, 10, 11, 50, 79, 80, 81, 90, 99, 100, 150]:
        assert float(fn(step)) == pytest.approx(reference(name, step), rel=1e-5, abs=1e-7), step


def test_schedules_are_pure_functions_of_step():
    fn = make_schedule("cosine", peak=3e-3, warmup_steps=5, total_steps=50)
    first = [float(fn(s)) for s in range(50)]
    second = [float(fn(s)) for s in reversed(range(50))][::-1]
    assert first == second
    assert np.argmax(first) == 4 and first[-1] < first[4]  # warmup reaches the peak at step 4
