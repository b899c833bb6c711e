"""Samplers against a numpy reference of the filtered distribution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.generate.sampling import SamplingParams, check_sampling, filtered_probs, sample


def reference_probs(logits, temperature, top_k, top_p, min_p):
    """One lane, written the slow obvious way: sort, cut, renormalise, in the documented order."""
    V = len(logits)
    if temperature == 0:
        out = np.zeros(V)
        out[np.argmax(logits)] = 1.0
        return out
    order = np.argsort(-logits, kind="stable")
    z = logits[order] / temperature
    keep = np.ones(V, bool)
    if top_k > 0:
        keep[top_k:] = False
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        cumulative, nucleus = 0.0, np.zeros(V, bool)
        for i in range(V):
            if not keep[i]:
                break
            nucleus[i] = True
            cumulative += p[i]
            if cumulative >= top_p:
                break
        keep &= nucleus
    keep &= p >= min_p * p[0]
    keep[0] = True
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    out = np.zeros(V)
    out[order] = p
    return out


CASES = [
    # temperature, top_k, top_p, min_p
    (0.0, 0, 1.0, 0.0),
    (1.0, 0, 1.0, 0.0),
    (0.7, 0, 1.0, 0.0),
    (1.0, 3, 1.0, 0.0),
    (1.0, 0, 0.6, 0.0),
    (1.3, 0, 0.9, 0.0),
    (1.0, 0, 1.0, 0.2),
    (0.8, 5, 0.8, 0.05),
    (1.0, 1, 1.0, 0.0),
    (1.0, 0, 1e-6, 0.0),
]


def params_for(cases):
    return SamplingParams(*(np.asarray(col, dtype) for col, dtype in zip(zip(*cases), (np.float32, np.int32, np.float32, np.float32))))


def test_filtered_probs_match_reference_for_every_filter():
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (len(CASES), 12)) * 2.0)
    got = np.asarray(filtered_probs(jnp.asarray(logits), params_for(CASES)))
    for lane, case in enumerate(CASES):
        np.testing.assert_allclose(got[lane], reference_probs(logits[lane].astype(np.float64), *case), atol=2e-6, err_msg=str(case))


def test_top_p_keeps_exactly_the_nucleus():
    # probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625: p=0.7 needs the first two (0.75 >= 0.7);
    # p=0.75 still two; p=0.76 three.
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    logits = jnp.asarray(np.log(probs)[None].repeat(3, 0))
    got = np.asarray(filtered_probs(logits, params_for([(1.0, 0, p, 0.0) for p in (0.7, 0.75, 0.76)])))
    assert (got > 0).sum(axis=1).tolist() == [2, 2, 3]
    np.testing.assert_allclose(got[0, :2], [2 / 3, 1 / 3], rtol=1e-5)


def test_samples_follow_the_filtered_distribution():
    n, V = 4000, 6
    logits = jnp.asarray(np.log([0.3, 0.25, 0.2, 0.15, 0.07, 0.03]), jnp.float32)
    case = (0.9, 4, 0.95, 0.1)
    params = params_for([case] * n)
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    draws = np.asarray(jax.jit(sample)(jnp.broadcast_to(logits, (n, V)), jax.random.key_data(keys), params))
    freq = np.bincount(draws, minlength=V) / n
    expected = reference_probs(np.asarray(logits, np.float64), *case)
    # 4,000 draws: the standard error of a frequency is at most 0.008; 0.035 is > 4 sigma.
    np.testing.assert_allclose(freq, expected, atol=0.035)
    assert freq[expected == 0].sum() == 0


def test_each_lane_depends_only_on_its_key_and_parameters():
    logits = jax.random.normal(jax.random.PRNGKey(2), (3, 50))
    keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(3), 3))
    mixed = sample(logits, keys, params_for([(1.0, 0, 0.9, 0.0), (0.0, 0, 1.0, 0.0), (1.0, 10, 1.0, 0.0)]))
    for lane, case in enumerate([(1.0, 0, 0.9, 0.0), (0.0, 0, 1.0, 0.0), (1.0, 10, 1.0, 0.0)]):
        alone = sample(logits, keys, params_for([case] * 3))
        assert int(alone[lane]) == int(mixed[lane])
    assert int(mixed[1]) == int(jnp.argmax(logits[1]))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_k=1.5), dict(top_p=0), dict(top_p=1.2), dict(min_p=2)])
def test_bad_sampling_parameters_are_clear_errors(bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        check_sampling(**bad)
