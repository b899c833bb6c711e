import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from lmjax.train.optimizer import make_optimizer, weight_decay_mask


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


def test_clipping_bounds_the_first_adam_step_direction():
    params = {"w": {"kernel": jnp.zeros((4,))}}
    tx, _ = make_optimizer(optim_cfg(weight_decay=0.0, clip_norm=1.0), total_steps=10)
    grads = {"w": {"kernel": jnp.array([300.0, -400.0, 0.0, 0.0])}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step is lr * sign(g) whatever the scale; clipping must keep it finite and signed.
    np.testing.assert_allclose(updates["w"]["kernel"][:2], [-0.1, 0.1], rtol=1e-4)


def test_recurrent_dynamics_are_not_decayed():
    from lmjax.train.optimizer import weight_decay_mask

    params = {"mixer": {"A_log": 1.0, "D": 1.0, "dt_bias": 1.0, "in_x": {"kernel": 1.0}},
              "recurrent": {"lambda": 1.0, "b_a": 1.0, "w_a": {"kernel": 1.0}}}
    mask = weight_decay_mask(params)
    assert mask == {"mixer": {"A_log": False, "D": False, "dt_bias": False, "in_x": {"kernel": True}},
                    "recurrent": {"lambda": False, "b_a": False, "w_a": {"kernel": True}}}
