"""The train state's construction: initial values, abstract shapes, and shardings on a layout.

Initialisation is sharded from the start: the shapes come from `jax.eval_shape`, the shardings
from the model's logical axis names through the layout's rules, and `jit(init_state,
out_shardings=...)` creates every shard on its own device, so no device ever holds the full
parameters unless the layout says so.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lmjax.train.step import TrainState


def _dummy_tokens(seq_len):
    return jnp.zeros((1, seq_len), jnp.int32)


def init_state_fn(model, tx, seq_len):
    def init_state(rng):
        init_rng, state_rng = jax.random.split(rng)
        params = nn.meta.unbox(model.init(init_rng, _dummy_tokens(seq_len))["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)

    return init_state


def state_from_params_fn(tx):
    """(params, rng) -> the train state `init_state_fn` would build around these parameters
    (imported weights): the same step, optimizer state and PRNG key, no random init."""
    def state_from_params(params, rng):
        _, state_rng = jax.random.split(rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)

    return state_from_params


def param_shardings(model, seq_len, layout):
    """Shardings of the (unboxed) parameters from their logical axis names."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _dummy_tokens(seq_len)))["params"]
    return layout.param_shardings(boxed)


def state_shardings(model, tx, seq_len, layout) -> TrainState:
    """Shardings of the whole train state: optimizer moments follow their parameters (through
    optax's own map from state leaves to parameters), counters and the PRNG key are replicated."""
    params = param_shardings(model, seq_len, layout)
    abstract_state = jax.eval_shape(init_state_fn(model, tx, seq_len), jax.random.PRNGKey(0))
    opt_state = optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_state.opt_state, params,
        transform_non_params=lambda _: layout.replicated,
    )
    return TrainState(step=layout.replicated, params=params, opt_state=opt_state, rng=layout.replicated)


def abstract_train_state(init_state, seed, shardings=None):
    """Shapes, dtypes and shardings of the train state (default: all on the first device), for
    restoring a checkpoint onto any layout."""
    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(seed))
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, abstract)
    return jax.tree_util.tree_map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract, shardings
    )
