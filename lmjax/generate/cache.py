"""The KV cache: one key and one value array per model, stacked over layers like nn.scan.

Shapes: [layers, lanes, max_len, kv_heads, head_dim]. Slot j of a lane holds the token at
position j of that lane's dialog, so a lane's length is the only bookkeeping the cache needs
and it lives with the decoder's lane state, not here. Logical axis names let the parallel
layout shard lanes over `data` and kv heads over `model` by rule, like parameters.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

CACHE_AXES = ("layers", "batch", "length", "heads", "kv")


class KVCache(NamedTuple):
    k: jax.Array
    v: jax.Array

    @property
    def lanes(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def cache_shape(model_cfg, lanes: int, max_len: int):
    head_dim = model_cfg.dim // model_cfg.n_heads
    return (model_cfg.n_layers, lanes, max_len, model_cfg.n_kv_heads, head_dim)


def init_cache(model_cfg, lanes: int, max_len: int, dtype=None) -> KVCache:
    """Zeros; `dtype` defaults to the model's compute dtype."""
    dtype = jnp.dtype(dtype or model_cfg.compute_dtype)
    shape = cache_shape(model_cfg, lanes, max_len)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
