"""Generation caches: what a model keeps per lane between decoding calls, by model family.

A family registers `cache_spec(model_cfg, lanes, max_len, dtype)`: a pytree of `CacheLeaf`
(shape, dtype, logical axes). The decoder builds zeros from it and, on a mesh, shards each
leaf by its logical axes like a parameter; the model's `__call__(..., cache=...)` takes and
returns that pytree.

Mamba and RNNs: their recurrent state (`MambaState`, `RNNState`), constant in size per lane.
Transformer: `KVCache(k, v)`, each [layers, lanes, max_len, kv_heads, head_dim] (stacked like
nn.scan). Slot j of a lane holds the token at position j of that lane's dialog, so a lane's
length is the only bookkeeping the cache needs and it lives with the decoder's lane state.
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from lmjax.models import mamba, rnn
from lmjax.models.mamba import MambaConfig
from lmjax.models.rnn import RNNConfig
from lmjax.models.scans import StateLeaf as CacheLeaf
from lmjax.models.scans import zeros_of
from lmjax.models.transformer import TransformerConfig

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


def _kv_cache_spec(cfg: TransformerConfig, lanes, max_len, dtype):
    head_dim = cfg.dim // cfg.n_heads
    leaf = CacheLeaf((cfg.n_layers, lanes, max_len, cfg.n_kv_heads, head_dim), dtype, CACHE_AXES)
    return KVCache(leaf, leaf)


CACHE_SPECS: dict[type, Callable] = {
    TransformerConfig: _kv_cache_spec,
    # Recurrent families: their state, whatever max_len (constant size per lane).
    MambaConfig: lambda cfg, lanes, max_len, dtype: mamba.state_spec(cfg, lanes, dtype),
    RNNConfig: lambda cfg, lanes, max_len, dtype: rnn.state_spec(cfg, lanes, dtype),
}


def cache_spec(model_cfg, lanes: int, max_len: int, dtype=None):
    """The cache of a model family as a pytree of CacheLeaf; `dtype` defaults to the compute dtype."""
    spec = CACHE_SPECS.get(type(model_cfg))
    if spec is None:
        raise ValueError(f"No generation cache is defined for {type(model_cfg).__name__} models.")
    return spec(model_cfg, lanes, max_len, jnp.dtype(dtype or model_cfg.compute_dtype))


def is_leaf(x) -> bool:
    return isinstance(x, CacheLeaf)


def init_cache(model_cfg, lanes: int, max_len: int, dtype=None):
    """Zeros in the shape of the family's cache."""
    return zeros_of(cache_spec(model_cfg, lanes, max_len, dtype))
