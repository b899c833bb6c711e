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

from lmjax.models.mamba import MambaConfig, MambaState
from lmjax.models.rnn import RNNConfig, RNNState
from lmjax.models.transformer import TransformerConfig

CACHE_AXES = ("layers", "batch", "length", "heads", "kv")


class CacheLeaf(NamedTuple):
    shape: tuple
    dtype: jnp.dtype
    axes: tuple  # logical axis names, one per dimension


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


def _mamba_state_spec(cfg: MambaConfig, lanes, max_len, dtype):
    """Constant size per lane, whatever max_len: the conv window and the SSM state (f32)."""
    return MambaState(
        conv=CacheLeaf((cfg.n_layers, lanes, cfg.d_conv - 1, cfg.d_inner), dtype, ("layers", "batch", "conv", "mlp")),
        ssm=CacheLeaf((cfg.n_layers, lanes, cfg.d_inner, cfg.d_state), jnp.float32, ("layers", "batch", "mlp", "state")),
    )


def _rnn_state_spec(cfg: RNNConfig, lanes, max_len, dtype):
    """Constant size per lane: the conv window and the hidden state (f32)."""
    W = cfg.rnn_width
    return RNNState(
        conv=CacheLeaf((cfg.n_layers, lanes, max(cfg.d_conv - 1, 0), W), dtype, ("layers", "batch", "conv", "mlp")),
        h=CacheLeaf((cfg.n_layers, lanes, W), jnp.float32, ("layers", "batch", "mlp")),
    )


CACHE_SPECS: dict[type, Callable] = {
    TransformerConfig: _kv_cache_spec, MambaConfig: _mamba_state_spec, RNNConfig: _rnn_state_spec,
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
    return jax.tree_util.tree_map(
        lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), cache_spec(model_cfg, lanes, max_len, dtype), is_leaf=is_leaf
    )
