"""Decode attention straight from a paged KV cache, with the Pallas kernels jax ships.

One query per lane (a decode step) against the first `lengths[b]` slots of lane b, read page by
page through the page table: no gathered copy of the lane's keys and values. The kernels are
jax's own (`jax.experimental.pallas.ops.gpu.paged_attention` for GPUs, Triton;
`...ops.tpu.paged_attention` for TPUs, Mosaic); lmjax keeps its pages in their layout
([kv_heads, pages, page_size, head_dim] per layer) so that nothing is transposed per step. On a
CPU the GPU kernel runs in Pallas's interpret mode: correct, slow, for tests; the decoder's
default there is the XLA gather path (lmjax.models.kv_cache).
"""
import jax
import jax.numpy as jnp


def default_backend():
    return {"gpu": "triton", "tpu": "mosaic_tpu"}.get(jax.default_backend(), "interpret")


def _splits(pages_per_lane: int, most: int) -> int:
    """The largest divisor of `pages_per_lane` up to `most` (the GPU kernel splits a lane's pages
    into that many parts, which must divide them)."""
    return max(d for d in range(1, min(most, pages_per_lane) + 1) if pages_per_lane % d == 0)


def paged_decode_attention(q_BxHxD, k_pages_KxNxPxD, v_pages_KxNxPxD, page_table_BxM, lengths_B, *, backend=None,
                           pages_per_compute_block: int = 4):
    """Attention output [B, H, D] of one query per lane over its first `lengths_B` slots.

    `page_table_BxM`: page ids per lane; entries for slots at or past a lane's length are never
    read (any id, e.g. the "no page" id, is clamped to a valid page first)."""
    backend = backend or default_backend()
    n_pages = k_pages_KxNxPxD.shape[1]
    table = jnp.where(page_table_BxM < n_pages, page_table_BxM, 0).astype(jnp.int32)
    lengths = lengths_B.astype(jnp.int32)
    M = table.shape[1]
    scale = q_BxHxD.shape[-1] ** -0.5  # the kernels leave the 1/sqrt(d) scaling to the caller
    q = (q_BxHxD * scale).astype(k_pages_KxNxPxD.dtype)
    if backend == "mosaic_tpu":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

        block = _splits(M, pages_per_compute_block)
        return paged_attention(q, k_pages_KxNxPxD, v_pages_KxNxPxD, lengths, table, pages_per_compute_block=block)
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    k_splits = _splits(M, 16)
    block = _splits(M // k_splits, pages_per_compute_block)
    return paged_attention(q, k_pages_KxNxPxD, v_pages_KxNxPxD, table, lengths, k_splits=k_splits,
                           pages_per_compute_block=block, interpret=backend == "interpret")
