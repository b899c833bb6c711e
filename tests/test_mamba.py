"""Mamba (lmjax/models/mamba.py) and its scans (lmjax/models/scans.py, lmjax/kernels/ssm_scan.py):
the three scans agree (values and gradients), packed rows equal separate sequences, the
one-token `step` equals the parallel forward, and a tiny model trains."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_facts_recipe
from lmjax.config import parse_config
from lmjax.models import build_model
from lmjax.models.mamba import Mamba, MambaConfig
from lmjax.models.scans import SSM_SCANS, causal_conv, segment_resets, selective_scan
from lmjax.registry import ConfigError

# f32 sums of a few hundred terms in different orders: 1e-5 relative, with slack for gradients.
TOL = dict(rtol=2e-4, atol=2e-5)


def random_ssm_inputs(key, B=2, L=21, D=8, N=4):
    k = jax.random.split(key, 7)
    x = jax.random.normal(k[0], (B, L, D))
    dt = jax.nn.softplus(jax.random.normal(k[1], (B, L, D)) - 1)
    A = -jnp.exp(jax.random.normal(k[2], (D, N)))
    Bm, C = jax.random.normal(k[3], (B, L, N)), jax.random.normal(k[4], (B, L, N))
    reset = jax.random.uniform(k[5], (B, L)) < 0.15
    h0 = jax.random.normal(k[6], (B, D, N))
    return x, dt, A, Bm, C, reset, h0


@pytest.mark.parametrize("method", ["chunked", "pallas"])
def test_scans_equal_the_sequential_reference_values_and_grads(method):
    x, dt, A, Bm, C, reset, h0 = random_ssm_inputs(jax.random.PRNGKey(0))

    def loss(method, x, dt, A, Bm, C, h0):  # touches every output, with uneven weights
        y, last = selective_scan(x, dt, A, Bm, C, reset, h0, method, chunk_size=8)  # L=21: a partial chunk
        return jnp.sum(jnp.sin(y)) + jnp.sum(last**2)

    grads = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5, 6)), static_argnums=0)
    ref, got = grads("sequential", x, dt, A, Bm, C, h0), grads(method, x, dt, A, Bm, C, h0)
    np.testing.assert_allclose(got[0], ref[0], **TOL)
    for g, r in zip(got[1], ref[1]):
        np.testing.assert_allclose(g, r, **TOL)
    scan = jax.jit(selective_scan, static_argnums=(7, 8))
    y_ref, last_ref = scan(x, dt, A, Bm, C, reset, h0, "sequential", 8)
    y, last = scan(x, dt, A, Bm, C, reset, h0, method, 8)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(last, last_ref, **TOL)


def test_causal_conv_matches_a_naive_loop_and_resets():
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    x, w, b = jax.random.normal(k[0], (1, 9, 3)), jax.random.normal(k[1], (4, 3)), jax.random.normal(k[2], (3,))
    segments = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 2]])
    y, window = causal_conv(x, w, b, segment_resets(segments), jnp.zeros((1, 3, 3)))
    expected = np.zeros((9, 3))
    for t in range(9):
        for k_back in range(4):
            s = t - k_back
            if s >= 0 and segments[0, s] == segments[0, t]:
                expected[t] += np.asarray(w[3 - k_back] * x[0, s])
    np.testing.assert_allclose(y[0], expected + np.asarray(b), **TOL)
    np.testing.assert_array_equal(window, x[:, -3:])


def tiny(scan="chunked", **kw):
    return MambaConfig(vocab_size=40, dim=16, n_layers=2, d_state=4, d_conv=4, scan=scan, chunk_size=4, **kw)


def loud(variables):
    """Larger weights than the 0.02 init, so the recurrence, not the head, dominates the logits."""
    def scale(path, p):
        return p * 20 if "kernel" in [getattr(k, "key", None) for k in path] else p

    return jax.tree_util.tree_map_with_path(scale, variables)


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_packed_row_equals_separate_sequences():
    model = Mamba(tiny())
    a = jax.random.randint(jax.random.PRNGKey(2), (1, 7), 0, 40)
    b = jax.random.randint(jax.random.PRNGKey(3), (1, 9), 0, 40)
    variables = loud(jax.jit(model.init)(jax.random.PRNGKey(0), a))
    # One call: the packed row, each sequence alone (followed by padding, which a causal model
    # cannot see), and the two concatenated without segment ids.
    ab, pad = jnp.concatenate([a, b], 1), jnp.zeros((1, 9), jnp.int32)
    tokens = jnp.concatenate([ab, jnp.concatenate([a, pad], 1), jnp.concatenate([b, pad[:, :7]], 1), ab])
    segments = jnp.array([[1] * 7 + [2] * 9] + [[1] * 16] * 3)
    packed, alone_a, alone_b, whole = jax.jit(model.apply)(variables, tokens, segment_ids_BxL=segments)
    np.testing.assert_allclose(packed[:7], alone_a[:7], **TOL)
    np.testing.assert_allclose(packed[7:], alone_b[:9], **TOL)
    assert np.abs(whole[7:] - packed[7:]).max() > 1e-3  # without the reset, b would see a


# Scanned layers (12 s) in the slow run; the decoder runs scanned Mamba in test_recurrent_generation.py.
@pytest.mark.parametrize("scan_layers", [pytest.param(True, marks=pytest.mark.slow), pytest.param(False, marks=pytest.mark.slow)])
def test_step_by_step_equals_the_parallel_forward(scan_layers):
    model = Mamba(tiny(scan="sequential", scan_layers=scan_layers))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 11), 0, 40)
    variables = loud(jax.jit(model.init)(jax.random.PRNGKey(0), tokens))
    parallel = jax.jit(model.apply)(variables, tokens)
    state = model.init_state(2)
    assert state.conv.shape == (2, 2, 3, 32) and state.ssm.shape == (2, 2, 32, 4)
    step = jax.jit(lambda v, t, s: model.apply(v, t, s, method="step"))
    stepped = []
    for t in range(tokens.shape[1]):
        logits, state = step(variables, tokens[:, t], state)
        stepped.append(logits)
    np.testing.assert_allclose(np.stack(stepped, 1), parallel, **TOL)
    # Prefill a prompt as one chunk, then step: the same logits again.
    prefill_logits, state = jax.jit(model.apply)(variables, tokens[:, :6], state=model.init_state(2))
    np.testing.assert_allclose(prefill_logits, parallel[:, :6], **TOL)
    logits, _ = step(variables, tokens[:, 6], state)
    np.testing.assert_allclose(logits, parallel[:, 6], **TOL)


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_model_scans_agree():
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 10), 0, 40)
    variables = loud(jax.jit(Mamba(tiny()).init)(jax.random.PRNGKey(0), tokens))
    outs = {s: jax.jit(Mamba(tiny(scan=s)).apply)(variables, tokens) for s in SSM_SCANS}
    for s in SSM_SCANS:
        np.testing.assert_allclose(outs[s], outs["sequential"], **TOL)


def test_config_builds_mamba_and_names_bad_scan():
    recipe = tiny_facts_recipe(**{"implementation.model": "mamba"})
    recipe.model.scan = "pallas"
    model = build_model(parse_config(recipe).model)
    assert isinstance(model, Mamba) and model.cfg.scan == "pallas"
    recipe.model.scan = "fast"
    with pytest.raises(ConfigError, match="model.scan; choose one of: sequential, chunked, pallas"):
        parse_config(recipe)


def test_every_parameter_has_logical_axis_names():
    model = Mamba(tiny())
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    names = {n for leaf in leaves for n in leaf.names}
    assert all(hasattr(leaf, "names") for leaf in leaves)
    assert names == {"layers", "embed", "mlp", "state", "conv", "rank", "vocab"}


@pytest.mark.slow  # a training run; the scans and the model are tested against references above
def test_mamba_trains_on_tiny_facts(tmp_path):
    from lmjax.train.loop import train

    recipe = tiny_facts_recipe(**{"implementation.model": "mamba", "train.steps": 20, "train.eval_every": 20,
                                  "checkpoint.every": 20})
    recipe.model.d_state, recipe.model.chunk_size = 4, 32
    train(parse_config(recipe), tmp_path)
    losses = [r["train/loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert losses[-1] < 0.9 * losses[0], losses
