"""What a model keeps between calls (a recurrent state, a KV cache), described before it exists.

Every family describes its generation cache as a pytree of `CacheLeaf` through
`model.cache_spec(lanes, max_len, dtype=None)`. The decoder (lmjax.generate.cache) builds zeros
from it and, on a mesh, shards each leaf by its logical axes like a parameter. Its own module so
that models and the decoder share the type without either importing the other's internals.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class CacheLeaf(NamedTuple):
    """One array of a cache or recurrent state: shape, dtype, logical axes."""

    shape: tuple
    dtype: Any
    axes: tuple


def is_leaf(x) -> bool:
    return isinstance(x, CacheLeaf)


def zeros_of(spec):
    """Zeros in the shape of a pytree of `CacheLeaf`, of the same structure."""
    return jax.tree_util.tree_map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), spec, is_leaf=is_leaf)
