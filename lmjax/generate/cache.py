"""Generation caches: what a model keeps per lane between decoding calls.

Each model family describes its own as a pytree of `CacheLeaf` (shape, dtype, logical axes,
lmjax.models.cache_spec) through `model.cache_spec(lanes, max_len, dtype=None)`: a `KVCache`
for the Transformer (lmjax.models.kv_cache; with `page_size=` a `PagedKVCache`, whose pages the
decoder hands out through lmjax.generate.pages), the recurrent state for Mamba and RNNs
(constant in size per lane). The decoder builds zeros from it and, on a mesh, shards each leaf
by its logical axes like a parameter; the model's `__call__(..., cache=...)` takes and returns
that pytree. This module is the decoder's whole view of a cache.
"""
from lmjax.models.cache_spec import is_leaf, zeros_of

__all__ = ["cache_spec", "init_cache", "is_leaf"]


def cache_spec(model, lanes: int, max_len: int, dtype=None):
    """The model's cache as a pytree of CacheLeaf; `dtype` defaults to its compute dtype."""
    if not hasattr(model, "cache_spec"):
        raise ValueError(f"No generation cache is defined for {type(model).__name__} models.")
    return model.cache_spec(lanes, max_len, dtype)


def init_cache(model, lanes: int, max_len: int, dtype=None):
    """Zeros in the shape of the model's cache."""
    return zeros_of(cache_spec(model, lanes, max_len, dtype))
