import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_dict

from lmjax.optim.optimizer import make_optimizer, weight_decay_mask


def optim_cfg(**kw):
    base = dict(lr=0.1, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.5, clip_norm=0.0, schedule="constant",
                warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2, grad_accum=1)
    return config_dict.ConfigDict({**base, **kw})


def test_decay_mask_skips_norm_scales():
    params = {"norm": {"scale": jnp.ones((2, 4))}, "proj": {"kernel": jnp.ones((4, 4))}, "embed": {"embedding": jnp.ones((3, 4))}}
    mask = weight_decay_mask(params)
    assert mask == {"norm": {"scale": False}, "proj": {"kernel": True}, "embed": {"embedding": True}}


def test_zero_gradient_update_is_pure_decoupled_weight_decay():
    params = {"norm": {"scale": jnp.full((3,), 2.0)}, "proj": {"kernel": jnp.full((2, 2), 2.0)}}
    tx, _ = make_optimizer(optim_cfg(), total_steps=10)
    state = tx.init(params)
    zeros = {"norm": {"scale": jnp.zeros(3)}, "proj": {"kernel": jnp.zeros((2, 2))}}
    updates, _ = tx.update(zeros, state, params)
    # AdamW: update = -lr * (adam_term + wd * param); adam term is 0 for a zero gradient.
    np.testing.assert_allclose(updates["proj"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["norm"]["scale"], 0.0)


def gradient_adam_sees(optim, grads, params):
    """The gradient after the transforms before Adam (the clip): Adam's first moment after one
    update from zero is (1 - b1) * g."""
    tx, _ = make_optimizer(optim, total_steps=10)
    _, state = tx.update(grads, tx.init(params), params)
    return jax.tree_util.tree_map(lambda mu: np.asarray(mu) / (1 - optim.b1), optax.tree.get(state, "mu"))


def test_clipping_scales_the_gradient_by_its_global_norm():
    params = {"a": {"kernel": jnp.zeros(2)}, "b": {"kernel": jnp.zeros(2)}}
    grads = {"a": {"kernel": jnp.array([3.0, 0.0])}, "b": {"kernel": jnp.array([-4.0, 12.0])}}
    # Global norm over both leaves: sqrt(9 + 16 + 144) = 13; clipped to 1, every entry is / 13
    # (a per-leaf clip would give [1, 0] for `a`; no clip, the gradient itself). The rtol covers
    # the float32 rounding of (1 - b1) * g / (1 - b1).
    seen = gradient_adam_sees(optim_cfg(weight_decay=0.0, clip_norm=1.0), grads, params)
    np.testing.assert_allclose(seen["a"]["kernel"], [3 / 13, 0.0], rtol=1e-6)
    np.testing.assert_allclose(seen["b"]["kernel"], [-4 / 13, 12 / 13], rtol=1e-6)
    # Under the threshold, and with clipping off (clip_norm=0), the gradient passes unchanged.
    for clip_norm in (20.0, 0.0):
        seen = gradient_adam_sees(optim_cfg(weight_decay=0.0, clip_norm=clip_norm), grads, params)
        np.testing.assert_allclose(seen["a"]["kernel"], [3.0, 0.0], rtol=1e-6)
        np.testing.assert_allclose(seen["b"]["kernel"], [-4.0, 12.0], rtol=1e-6)


def test_recurrent_dynamics_are_not_decayed():
    from lmjax.optim.optimizer import weight_decay_mask

    params = {"mixer": {"A_log": 1.0, "D": 1.0, "dt_bias": 1.0, "in_x": {"kernel": 1.0}},
              "recurrent": {"lambda": 1.0, "b_a": 1.0, "w_a": {"kernel": 1.0}}}
    mask = weight_decay_mask(params)
    assert mask == {"mixer": {"A_log": False, "D": False, "dt_bias": False, "in_x": {"kernel": True}},
                    "recurrent": {"lambda": False, "b_a": False, "w_a": {"kernel": True}}}
