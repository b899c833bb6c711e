"""The Transformer's generation caches: one contiguous block of slots per lane, or pages.

Both hold the keys and values of every layer (stacked like nn.scan) and answer one call,
`update(layer, slots_BxL, k, v, n_slots)`: write a chunk's keys and values at the lanes' slots
(slots >= `max_len` are dropped: that is how padding tokens are left out) and return this
layer's keys and values over slots [0, n_slots) of every lane, beside the updated cache. The
attention module sees nothing else, so the cache layout is swapped here and nowhere else.

The whole stacked cache goes in and out rather than per-layer slices that the caller stacks
again, so that XLA updates it in place.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Logical axes of the cache arrays: on a mesh the decoder shards the cache by them. Pages are
# shared by lanes, so they are not split by `batch`; the page table is read whole by every lane.
KV_CACHE_AXES = ("layers", "batch", "length", "heads", "kv")
PAGED_KV_AXES = ("layers", "heads", "pages", "length", "kv")
PAGE_TABLE_AXES = (None, None)


class KVCache(NamedTuple):
    """Keys and values, each [layers, lanes, max_len, kv_heads, head_dim]. Slot j of a lane holds
    the token at position j of its dialog: a lane's length is its only bookkeeping."""

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, layer, slots_BxL, k_BxLxKxD, v_BxLxKxD, n_slots: int):
        rows_Bx1 = jnp.arange(k_BxLxKxD.shape[0])[:, None]
        k = self.k.at[layer, rows_Bx1, slots_BxL].set(k_BxLxKxD.astype(self.k.dtype), mode="drop")
        v = self.v.at[layer, rows_Bx1, slots_BxL].set(v_BxLxKxD.astype(self.v.dtype), mode="drop")
        return k[layer, :, :n_slots], v[layer, :, :n_slots], KVCache(k, v)


class PagedKVCache(NamedTuple):
    """Keys and values in fixed-size pages, each [layers, kv_heads, pages, page_size, head_dim]
    (the layout of jax's Pallas paged-attention kernels, lmjax.kernels.paged_attention), and a
    page table [lanes, max_len // page_size]: slot j of lane b lives at offset j % page_size of
    page `page_table[b, j // page_size]`. Entries equal to the number of pages mean "no page":
    writes there are dropped and reads give zeros (masked out anyway).

    Lanes may point at the same page (a shared prefix); the host (lmjax.generate.pages) never
    lets a lane write into a page another lane reads."""

    k: jax.Array
    v: jax.Array
    page_table: jax.Array

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def max_len(self) -> int:
        return self.page_table.shape[1] * self.page_size

    def update(self, layer, slots_BxL, k_BxLxKxD, v_BxLxKxD, n_slots: int):
        P, n_pages = self.page_size, self.k.shape[2]
        page_BxL = jnp.take_along_axis(self.page_table, slots_BxL // P, axis=1, mode="fill", fill_value=n_pages)
        offset_BxL = slots_BxL % P

        def write(pages, new_BxLxKxD):  # indexed [B, L] x kv heads: the new values' own layout
            return pages.at[layer, :, page_BxL, offset_BxL].set(new_BxLxKxD.astype(pages.dtype), mode="drop")

        k, v = write(self.k, k_BxLxKxD), write(self.v, v_BxLxKxD)
        used_pages = -(-n_slots // P)

        def read(pages):
            got = pages[layer].at[:, self.page_table[:, :used_pages]].get(mode="fill", fill_value=0)  # [K, B, n, P, D]
            B, K, D = got.shape[1], got.shape[0], got.shape[-1]
            return got.transpose(1, 2, 3, 0, 4).reshape(B, used_pages * P, K, D)[:, :n_slots]

        return read(k), read(v), PagedKVCache(k, v, self.page_table)
