"""The train step: gradient accumulation equals the full batch; masked tokens carry no loss."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.train.state import init_state_fn
from lmjax.optim.optimizer import make_optimizer
from lmjax.train.step import make_train_step, token_losses

MODEL = Transformer(TransformerConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=32))
OPTIM = config_dict.ConfigDict(dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=0.0,
                                    schedule="constant", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2, grad_accum=1))


def random_batch(seed, B=8, L=12):
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.integers(0, 40, (B, L)).astype(np.int32),
        "targets": rng.integers(0, 40, (B, L)).astype(np.int32),
        "loss_mask": rng.integers(0, 2, (B, L)).astype(np.int32),
        "segment_ids": np.ones((B, L), np.int32),
        "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
    }


@functools.cache
def optimizer():
    """One optimizer for the module, so that each jitted function below compiles once."""
    return make_optimizer(OPTIM, 10)


@functools.cache
def jitted_init():
    return jax.jit(init_state_fn(MODEL, optimizer()[0], 12))


@functools.cache
def train_step(grad_accum=1):
    tx, schedule = optimizer()
    return make_train_step(MODEL.apply, tx, schedule, grad_accum)


def fresh_state():
    return jitted_init()(jax.random.PRNGKey(0))


def test_grad_accumulation_matches_one_big_batch():
    batch = random_batch(0)
    full_state, full_metrics = train_step(1)(fresh_state(), batch)
    accum_state, accum_metrics = train_step(4)(fresh_state(), batch)
    # Same sums in a different order: f32 rounding only.
    np.testing.assert_allclose(accum_metrics["train/loss"], full_metrics["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(accum_metrics["train/grad_norm"], full_metrics["train/grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(accum_state.params), jax.tree_util.tree_leaves(full_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert int(accum_state.step) == 1


def test_loss_is_the_masked_mean_of_token_cross_entropy():
    state = fresh_state()
    batch = random_batch(1)
    logits = MODEL.apply({"params": state.params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], axis=-1)[..., 0]
    expected = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    _, metrics = train_step()(state, batch)
    np.testing.assert_allclose(metrics["train/loss"], expected, rtol=1e-5)


def test_targets_under_the_mask_do_not_matter():
    batch = random_batch(2)
    changed = dict(batch, targets=np.where(batch["loss_mask"] == 1, batch["targets"], (batch["targets"] + 7) % 40))
    s1, m1 = train_step()(fresh_state(), batch)
    s2, m2 = train_step()(fresh_state(), changed)
    assert float(m1["train/loss"]) == float(m2["train/loss"])
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
        np.testing.assert_array_equal(a, b)


def test_token_losses_shape():
    losses, logits = token_losses(MODEL.apply, fresh_state().params, random_batch(3))
    assert losses.shape == (8, 12) and logits.shape == (8, 12, 40) and logits.dtype == jnp.float32
