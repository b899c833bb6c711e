"""Hawk, minGRU and minLSTM (lmjax/models/rnn.py) and the linear scans (lmjax/models/scans.py):
the scans agree (values and gradients), packed rows equal separate sequences, one-token `step`
equals the parallel scan, and a tiny model of each cell trains."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_facts_recipe
from lmjax.config import parse_config
from lmjax.models import build_model
from lmjax.models.rnn import CELLS, RNN, RNNConfig
from lmjax.models.scans import linear_scan
from lmjax.registry import ConfigError

# f32 products and sums in different orders: 1e-5 relative, with slack for gradients.
TOL = dict(rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("method", ["associative", "chunked"])
def test_linear_scans_equal_the_sequential_reference_values_and_grads(method):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    a = jax.random.uniform(k[0], (2, 19, 5), minval=0.5, maxval=1.0)
    b, h0 = jax.random.normal(k[1], (2, 19, 5)), jax.random.normal(k[2], (2, 5))
    reset = jax.random.uniform(k[3], (2, 19)) < 0.15

    @jax.jit
    def value_and_grads(a, b, h0):
        def loss(method, a, b, h0):
            h, last = linear_scan(a, b, h0, reset, method, chunk_size=8)  # L=19: a partial chunk
            return jnp.sum(jnp.sin(h)) + jnp.sum(last**2), (h, last)

        grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
        return grad("sequential", a, b, h0), grad(method, a, b, h0)

    (ref, ref_grads), (got, got_grads) = value_and_grads(a, b, h0)
    for g, r in zip(jax.tree_util.tree_leaves((got, got_grads)), jax.tree_util.tree_leaves((ref, ref_grads))):
        np.testing.assert_allclose(g, r, **TOL)


def tiny(cell, **kw):
    return RNNConfig(vocab_size=40, dim=16, n_layers=2, cell=cell, d_conv=4 if cell == "hawk" else 0, chunk_size=4, **kw)


def loud(variables):
    """Larger weights than the 0.02 init, so the recurrence, not the head, dominates the logits."""
    def scale(path, p):
        return p * 20 if "kernel" in [getattr(k, "key", None) for k in path] else p

    return jax.tree_util.tree_map_with_path(scale, variables)


@pytest.mark.parametrize("cell", CELLS)
def test_packed_row_equals_separate_sequences_and_step_equals_parallel(cell):
    model = RNN(tiny(cell))
    a = jax.random.randint(jax.random.PRNGKey(2), (1, 7), 0, 40)
    b = jax.random.randint(jax.random.PRNGKey(3), (1, 9), 0, 40)
    variables = loud(jax.jit(model.init)(jax.random.PRNGKey(0), a))
    ab, pad = jnp.concatenate([a, b], 1), jnp.zeros((1, 9), jnp.int32)
    tokens = jnp.concatenate([ab, jnp.concatenate([a, pad], 1), jnp.concatenate([b, pad[:, :7]], 1), ab])
    segments = jnp.array([[1] * 7 + [2] * 9] + [[1] * 16] * 3)
    logits = jax.jit(model.apply)(variables, tokens, segment_ids_BxL=segments)
    packed, alone_a, alone_b, whole = logits
    np.testing.assert_allclose(packed[:7], alone_a[:7], **TOL)
    np.testing.assert_allclose(packed[7:], alone_b[:9], **TOL)
    assert np.abs(whole[7:] - packed[7:]).max() > 1e-3  # without the reset, b would see a

    # Token by token from `init_state` (rows 2-4: one segment each) equals the parallel scan.
    state = model.init_state(3)
    W = model.cfg.rnn_width
    assert state.h.shape == (2, 3, W) and state.conv.shape == (2, 3, max(model.cfg.d_conv - 1, 0), W)
    step = jax.jit(lambda v, t, s: model.apply(v, t, s, method="step"))
    stepped = []
    for t in range(tokens.shape[1]):
        out, state = step(variables, tokens[1:, t], state)
        stepped.append(out)
    np.testing.assert_allclose(np.stack(stepped, 1), logits[1:], **TOL)


def test_config_builds_each_cell_and_names_bad_ones():
    recipe = tiny_facts_recipe(**{"implementation.model": "rnn"})
    assert build_model(parse_config(recipe).model).cfg.cell == "hawk"
    for cell in ("minlstm", "mingru"):
        recipe.model.cell = cell
        assert build_model(parse_config(recipe).model).cfg.cell == cell
    recipe.model.cell = "lstm"
    with pytest.raises(ConfigError, match="model.cell; choose one of: hawk, mingru, minlstm"):
        parse_config(recipe)


def test_every_parameter_has_logical_axis_names():
    for cell in CELLS:
        model = RNN(tiny(cell))
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
        leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
        assert all(hasattr(leaf, "names") for leaf in leaves)
        assert {n for leaf in leaves for n in leaf.names} <= {"layers", "embed", "mlp", "conv", "rnn_in", "vocab"}


@pytest.mark.slow  # training runs; the cells and scans are tested against references above
@pytest.mark.parametrize("cell", ["hawk", "minlstm"])  # minGRU is minLSTM's simpler sibling; the loop is ~10 s a cell
def test_rnn_trains_on_tiny_facts(cell, tmp_path):
    from lmjax.train.loop import train

    recipe = tiny_facts_recipe(**{"implementation.model": "rnn", "train.steps": 16, "train.eval_every": 16,
                                  "checkpoint.every": 16})
    recipe.model.cell = cell
    train(parse_config(recipe), tmp_path)
    losses = [r["train/loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert losses[-1] < 0.9 * losses[0], losses
