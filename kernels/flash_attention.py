"""Flash attention in Pallas: forward and backward kernels, masks computed per block.

The kernels never see a dense [B, L, S] mask. They get what the mask is made of, per token:
segment ids (0 = padding), positions (the order causality follows) and a prompt flag, for the
queries and for the keys, and decide per (query, key) pair:

    allowed = same segment and (padding query ? key position == query position
                                               : key position <= query position or both prompt)

which is exactly `lmjax.models.masks.attention_mask` (packed, causal, prefix-LM; padding attends
to itself) when positions are the row indices, and `cache_attention_mask` when the keys are cache
slots (see `lmjax.models.attention.AttentionMask`). A (query block, key block) pair whose segment
ranges do not overlap, or whose keys all come after its queries with no prompt on both sides, is
skipped (`lax.cond`), so causal attention does about half the work.

Softmax is online in f32 (running max and sum, one pass over the key blocks); the forward saves
the log-sum-exp per query and the backward recomputes the probabilities from it in two kernels:
dq (one program per query block, looping over key blocks) and dk/dv (one program per key block
and query head, looping over query blocks; the H // K query heads sharing a kv head are summed
afterwards). Grouped-query heads: query head h reads kv head h // (H // K).

Lengths need not be multiples of the block sizes: the wrapper pads and the padded keys belong
to no segment. `backend` picks the `pallas_call` parameters; the kernel bodies are shared:
  "triton"     GPU (Triton lowering): num_warps / num_stages; blocks rounded to powers of two.
  "mosaic_tpu" TPU (Mosaic): dimension semantics; run it on CPU under
               `pltpu.force_tpu_interpret_mode()`. Not yet compiled on a real TPU.
  "interpret"  any device, `interpret=True` (the CPU default; slow, for tests).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

BACKENDS = ("triton", "mosaic_tpu", "interpret")
# Finite, so that max/exp of fully masked rows stay free of inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_PAD_Q_SEGMENT, _PAD_KV_SEGMENT = -2, -1  # padded rows/columns match no segment


def default_backend():
    return {"gpu": "triton", "tpu": "mosaic_tpu"}.get(jax.default_backend(), "interpret")


# ----------------------------------------------------------------------------- kernel bodies


def _allowed(q_meta, kv_meta):
    """[bq, bk] boolean mask from per-token (segment, position, prompt) of a block pair."""
    q_seg, q_pos, q_prompt = (a[:, None] for a in q_meta)
    kv_seg, kv_pos, kv_prompt = (a[None, :] for a in kv_meta)
    order = (kv_pos <= q_pos) | ((q_prompt != 0) & (kv_prompt != 0))
    return (q_seg == kv_seg) & jnp.where(q_seg == 0, kv_pos == q_pos, order)


def _may_interact(q_meta, kv_meta):
    """Conservative scalar test on block summaries: False only if no pair can be allowed."""
    q_seg, q_pos, q_prompt = q_meta
    kv_seg, kv_pos, kv_prompt = kv_meta
    segments_overlap = (jnp.min(q_seg) <= jnp.max(kv_seg)) & (jnp.min(kv_seg) <= jnp.max(q_seg))
    some_key_not_after = jnp.min(kv_pos) <= jnp.max(q_pos)
    prompts_meet = (jnp.max(q_prompt) > 0) & (jnp.max(kv_prompt) > 0)
    return segments_overlap & (some_key_not_after | prompts_meet)


def _load_meta(refs, start=None, size=None):
    return tuple(r[...] if start is None else r[pl.ds(start, size)] for r in refs)


def _dot(a, b, contract=(1, 0)):
    """a @ b (contract=(1, 0)), a @ b.T ((1, 1)) or a.T @ b ((0, 0)), accumulated in f32."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def _scores(q, k, q_meta, kv_meta, scale):
    s = _dot(q, k, (1, 1)) * scale
    mask = _allowed(q_meta, kv_meta)
    return s, mask


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, scale, block_k, num_kv_blocks):
    q_meta_refs, kv_meta_refs, (o_ref, lse_ref) = refs[:3], refs[3:6], refs[6:]
    q = q_ref[...]
    q_meta = _load_meta(q_meta_refs)
    bq, d = q.shape

    def body(j, carry):
        start = pl.multiple_of(j * block_k, block_k)
        kv_meta = _load_meta(kv_meta_refs, start, block_k)

        def update(carry):
            m, l, acc = carry
            k, v = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
            s, mask = _scores(q, k, q_meta, kv_meta, scale)
            m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, MASK_VALUE), axis=1))
            p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
            alpha = jnp.exp(m - m_new)
            acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
            return m_new, l * alpha + jnp.sum(p, axis=1), acc

        return lax.cond(_may_interact(q_meta, kv_meta), update, lambda c: c, carry)

    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, d), jnp.float32))
    m, l, acc = lax.fori_loop(0, num_kv_blocks, body, init)
    empty = l == 0.0  # only padded query rows: no allowed key anywhere
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, block_k, num_kv_blocks):
    q_meta_refs, kv_meta_refs, (dq_ref,) = refs[:3], refs[3:6], refs[6:]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_meta = _load_meta(q_meta_refs)

    def body(j, dq):
        start = pl.multiple_of(j * block_k, block_k)
        kv_meta = _load_meta(kv_meta_refs, start, block_k)

        def update(dq):
            k, v = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
            s, mask = _scores(q, k, q_meta, kv_meta, scale)
            p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
            ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
            return dq + _dot(ds.astype(k.dtype), k)

        return lax.cond(_may_interact(q_meta, kv_meta), update, lambda c: c, dq)

    dq = lax.fori_loop(0, num_kv_blocks, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, block_q, num_q_blocks):
    q_meta_refs, kv_meta_refs, (dk_ref, dv_ref) = refs[:3], refs[3:6], refs[6:]
    k, v = k_ref[...], v_ref[...]
    kv_meta = _load_meta(kv_meta_refs)

    def body(i, carry):
        start = pl.multiple_of(i * block_q, block_q)
        q_meta = _load_meta(q_meta_refs, start, block_q)

        def update(carry):
            dk, dv = carry
            q, do = q_ref[pl.ds(start, block_q), :], do_ref[pl.ds(start, block_q), :]
            lse, delta = lse_ref[pl.ds(start, block_q)], delta_ref[pl.ds(start, block_q)]
            s, mask = _scores(q, k, q_meta, kv_meta, scale)
            p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
            ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
            dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
            return dk, dv

        return lax.cond(_may_interact(q_meta, kv_meta), update, lambda c: c, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, num_q_blocks, body, (zeros, zeros))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


# ----------------------------------------------------------------------------- pallas_calls


def _call_params(backend, grid_rank, num_warps, num_stages):
    """The backend switch: everything that differs between GPU, TPU and interpret mode."""
    if backend == "triton":
        from jax.experimental.pallas import triton as plgpu

        return dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages))
    if backend == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu

        return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank))
    if backend == "interpret":
        return dict(interpret=True)
    raise ValueError(f"Unknown flash attention backend {backend!r}; choose one of: {', '.join(BACKENDS)}.")


def _specs(G, block_q, block_k, Lp, Sp, D, by):
    """BlockSpecs over q/do [B, H, Lp, D], k/v [B, K, Sp, D], per-query [B, H, Lp], per-token
    metadata [B, Lp] / [B, Sp]. `by` = "q": grid (b, h, query block); "kv": (b, h, key block)."""
    if by == "q":
        q_blk = pl.BlockSpec((None, None, block_q, D), lambda b, h, i: (b, h, i, 0))
        kv_full = pl.BlockSpec((None, None, Sp, D), lambda b, h, i: (b, h // G, 0, 0))
        row_blk = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
        q_meta = pl.BlockSpec((None, block_q), lambda b, h, i: (b, i))
        kv_meta = pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0))
        return q_blk, kv_full, row_blk, q_meta, kv_meta
    q_full = pl.BlockSpec((None, None, Lp, D), lambda b, h, j: (b, h, 0, 0))
    kv_blk = pl.BlockSpec((None, None, block_k, D), lambda b, h, j: (b, h // G, j, 0))
    row_full = pl.BlockSpec((None, None, Lp), lambda b, h, j: (b, h, 0))
    q_meta = pl.BlockSpec((None, Lp), lambda b, h, j: (b, 0))
    kv_meta = pl.BlockSpec((None, block_k), lambda b, h, j: (b, j))
    dkv_out = pl.BlockSpec((None, None, block_k, D), lambda b, h, j: (b, h, j, 0))
    return q_full, kv_blk, row_full, q_meta, kv_meta, dkv_out


def _forward(q, k, v, meta, cfg):
    block_q, block_k, backend, num_warps, num_stages = cfg
    B, H, Lp, D = q.shape
    K, Sp = k.shape[1], k.shape[2]
    q_blk, kv_full, row_blk, q_meta, kv_meta = _specs(H // K, block_q, block_k, Lp, Sp, D, "q")
    kernel = functools.partial(_fwd_kernel, scale=D**-0.5, block_k=block_k, num_kv_blocks=Sp // block_k)
    return pl.pallas_call(
        kernel,
        grid=(B, H, Lp // block_q),
        in_specs=[q_blk, kv_full, kv_full] + [q_meta] * 3 + [kv_meta] * 3,
        out_specs=[q_blk, row_blk],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Lp), jnp.float32)],
        name="flash_attention_fwd",
        **_call_params(backend, 3, num_warps, num_stages),
    )(q, k, v, *meta)


def _backward(q, k, v, o, lse, do, meta, cfg):
    block_q, block_k, backend, num_warps, num_stages = cfg
    B, H, Lp, D = q.shape
    K, Sp = k.shape[1], k.shape[2]
    G = H // K
    params = _call_params(backend, 3, num_warps, num_stages)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, Lp]

    q_blk, kv_full, row_blk, q_meta, kv_meta = _specs(G, block_q, block_k, Lp, Sp, D, "q")
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=D**-0.5, block_k=block_k, num_kv_blocks=Sp // block_k),
        grid=(B, H, Lp // block_q),
        in_specs=[q_blk, kv_full, kv_full, q_blk, row_blk, row_blk] + [q_meta] * 3 + [kv_meta] * 3,
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_attention_dq",
        **params,
    )(q, k, v, do, lse, delta, *meta)

    q_full, kv_blk, row_full, q_meta, kv_meta, dkv_out = _specs(G, block_q, block_k, Lp, Sp, D, "kv")
    dk_h, dv_h = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=D**-0.5, block_q=block_q, num_q_blocks=Lp // block_q),
        grid=(B, H, Sp // block_k),
        in_specs=[q_full, kv_blk, kv_blk, q_full, row_full, row_full] + [q_meta] * 3 + [kv_meta] * 3,
        out_specs=[dkv_out, dkv_out],
        out_shape=[jax.ShapeDtypeStruct((B, H, Sp, D), jnp.float32)] * 2,
        name="flash_attention_dkv",
        **params,
    )(q, k, v, do, lse, delta, *meta)
    # Query heads h = kv * G + g share kv head `kv`: sum their contributions.
    dk = dk_h.reshape(B, K, G, Sp, D).sum(2).astype(k.dtype)
    dv = dv_h.reshape(B, K, G, Sp, D).sum(2).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, meta, cfg):
    return _forward(q, k, v, meta, cfg)[0]


def _flash_fwd(q, k, v, meta, cfg):
    o, lse = _forward(q, k, v, meta, cfg)
    return o, (q, k, v, o, lse, meta)


def _flash_bwd(cfg, residuals, do):
    q, k, v, o, lse, meta = residuals
    dq, dk, dv = _backward(q, k, v, o, lse, do, meta, cfg)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public API


def _fit_block(block, length, backend):
    """The block size actually used: `block`, or smaller for a short sequence (a power of two
    on Triton, which needs power-of-two block shapes; a multiple of 8 elsewhere)."""
    if length >= block:
        return block
    if backend == "triton":
        return max(16, pl.next_power_of_2(length))
    return -(-length // 8) * 8


def _pad_to(x, axis, size, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value) if size != x.shape[axis] else x


def flash_attention(
    q_BxLxHxD, k_BxSxKxD, v_BxSxKxD,
    q_segment_ids_BxL, kv_segment_ids_BxS, q_positions_BxL, kv_positions_BxS,
    q_prompt_BxL=None, kv_prompt_BxS=None,
    *, block_q=128, block_k=128, backend=None, num_warps=4, num_stages=2,
):
    """Attention [B, L, H, D] with the mask computed per block from its parts (see module doc).

    Segment ids: int, 0 = padding (attends only to the key at its own position). Positions:
    int, the order causality follows. Prompt flags (prefix-LM): bool or int, None = no prompt.
    `block_q`/`block_k`: tile sizes (smaller for short sequences; L and S need not be
    multiples). `backend`: "triton", "mosaic_tpu" or "interpret"; None picks from the default
    device. Differentiable (custom VJP with Pallas dq and dk/dv kernels).
    """
    backend = backend or default_backend()
    B, L, H, D = q_BxLxHxD.shape
    S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    if H % K:
        raise ValueError(f"{H} query heads cannot share {K} kv heads; H must be a multiple of K.")
    if backend == "triton" and (D < 16 or D & (D - 1)):
        raise ValueError(f"Head dim {D} is not supported by the Triton backend; use a power of two >= 16.")
    bq, bk = _fit_block(block_q, L, backend), _fit_block(block_k, S, backend)
    Lp, Sp = -(-L // bq) * bq, -(-S // bk) * bk

    def meta(x, n, pad_value):
        return _pad_to(jnp.asarray(x).astype(jnp.int32), 1, n, pad_value)

    no_prompt_q, no_prompt_kv = jnp.zeros((B, L), jnp.int32), jnp.zeros((B, S), jnp.int32)
    metadata = (
        meta(q_segment_ids_BxL, Lp, _PAD_Q_SEGMENT),
        meta(q_positions_BxL, Lp, 0),
        meta(no_prompt_q if q_prompt_BxL is None else q_prompt_BxL, Lp, 0),
        meta(kv_segment_ids_BxS, Sp, _PAD_KV_SEGMENT),
        meta(kv_positions_BxS, Sp, 0),
        meta(no_prompt_kv if kv_prompt_BxS is None else kv_prompt_BxS, Sp, 0),
    )
    q = _pad_to(q_BxLxHxD.transpose(0, 2, 1, 3), 2, Lp)
    k = _pad_to(k_BxSxKxD.transpose(0, 2, 1, 3), 2, Sp)
    v = _pad_to(v_BxSxKxD.transpose(0, 2, 1, 3), 2, Sp)
    out = _flash(q, k, v, metadata, (bq, bk, backend, num_warps, num_stages))
    return out[:, :, :L].transpose(0, 2, 1, 3)
