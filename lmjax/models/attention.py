"""Grouped-query self-attention with RoPE, in three swappable parts:

- projections + RoPE (`Attention.qkv`), through `Attention.projection` (quantized or LoRA
  weights replace that module, nothing else);
- the KV-cache write and read (`cache.update`: a contiguous or a paged cache, lmjax.models.kv_cache);
- the attention itself (`attend`), which picks the implementation by name and decides block
  skipping.

Every implementation in `ATTENTION_IMPLEMENTATIONS` is `fn(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask)`
where `mask` is an `AttentionMask` (the dense [B, L, S] mask plus what it is made of) or, for the
dense-mask implementations (xla, cudnn), a plain boolean [B, L, S] array.

Block skipping (`block` > 0, dense-mask implementations, packed self-attention): queries run in
blocks of `block` rows, each against only the keys its mask can allow: none after the block
(causal) and, when the mask knows that no packed sequence is longer than `max_segment_len`, none
further back than that. The result is the full computation's (masked scores are exactly zero
weights either way); the work at 256-token rows of <= 86-token dialogs is 48% of the full square.
"""
from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lmjax.models.kv_cache import PagedKVCache
from lmjax.models.layers import Projection, apply_rope, init_for
from lmjax.models.masks import attention_mask, cache_attention_mask


@flax.struct.dataclass
class AttentionMask:
    """Who may attend to whom, both as a dense mask and as the per-token parts it is made of:

        allowed[b, i, j] = q_segment_ids[b, i] == kv_segment_ids[b, j] and
                           (kv_positions[b, j] == q_positions[b, i]     if q_segment_ids[b, i] == 0
                            else kv_positions[b, j] <= q_positions[b, i] or q_prompt[b, i] and kv_prompt[b, j])

    Dense-mask implementations read `dense_BxLxS`; flash kernels read the parts and never build
    [B, L, S]. (Under jit the unused dense mask costs nothing: XLA drops it.) Build it with
    `packed` (training: the rule of `masks.attention_mask`) or `cache` (generation: the rule of
    `masks.cache_attention_mask`). A pytree, so it passes through nn.scan / remat like an array.

    Static facts about the rows, for block skipping (`key_ranges`): `max_segment_len` (0 =
    unknown) bounds every packed sequence, and `prompt_both_ways` says prompt tokens may
    attend forward (prefix-LM); `self_attention` is False for a KV cache's slots.
    """

    dense_BxLxS: jax.Array
    q_segment_ids_BxL: jax.Array
    kv_segment_ids_BxS: jax.Array
    q_positions_BxL: jax.Array
    kv_positions_BxS: jax.Array
    q_prompt_BxL: jax.Array
    kv_prompt_BxS: jax.Array
    max_segment_len: int = flax.struct.field(pytree_node=False, default=0)
    prompt_both_ways: bool = flax.struct.field(pytree_node=False, default=False)
    self_attention: bool = flax.struct.field(pytree_node=False, default=True)

    @classmethod
    def packed(cls, segment_ids_BxL, prompt_BxL=None, max_segment_len: int = 0):
        """Self-attention over packed rows (0 = padding), causal by index, prefix-LM prompts.
        `max_segment_len`: a promise that no packed sequence is longer (0 = no promise)."""
        B, L = segment_ids_BxL.shape
        index_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        prompt = jnp.zeros((B, L), bool) if prompt_BxL is None else prompt_BxL.astype(bool)
        dense = attention_mask(segment_ids_BxL, prompt_BxL)
        return cls(dense, segment_ids_BxL, segment_ids_BxL, index_BxL, index_BxL, prompt, prompt,
                   max_segment_len=max_segment_len, prompt_both_ways=prompt_BxL is not None)

    @classmethod
    def cache(cls, positions_BxL, cache_len: int, prompt_BxL=None):
        """Chunk queries at `positions_BxL` against the `cache_len` slots of a KV cache."""
        B, L = positions_BxL.shape
        slots_BxS = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32), (B, cache_len))
        if prompt_BxL is None:
            q_prompt, kv_prompt = jnp.zeros((B, L), bool), jnp.zeros((B, cache_len), bool)
        else:
            q_prompt = prompt_BxL.astype(bool)
            prompt_len_B = jnp.max(jnp.where(q_prompt, positions_BxL + 1, 0), axis=1)
            kv_prompt = slots_BxS < prompt_len_B[:, None]
        dense = cache_attention_mask(positions_BxL, cache_len, prompt_BxL)
        ones_q, ones_kv = jnp.ones((B, L), jnp.int32), jnp.ones((B, cache_len), jnp.int32)
        return cls(dense, ones_q, ones_kv, positions_BxL, slots_BxS, q_prompt, kv_prompt, self_attention=False)


def key_ranges(length: int, block: int, max_segment_len: int = 0, prompt_both_ways: bool = False):
    """[(q0, q1, k0, k1)]: query rows [q0, q1) of a packed self-attention row of `length` need
    only keys [k0, k1). Causal: nothing after q1 - 1, unless prompts attend forward (then up to
    max_segment_len - 1 ahead, or the whole row when that is unknown). With a known
    `max_segment_len`, nothing more than max_segment_len - 1 back."""
    reach = max_segment_len - 1 if max_segment_len > 0 else None
    ranges = []
    for q0 in range(0, length, block):
        q1 = min(length, q0 + block)
        k0 = 0 if reach is None else max(0, q0 - reach)
        k1 = q1 if not prompt_both_ways else (length if reach is None else min(length, q1 + reach))
        ranges.append((q0, q1, k0, k1))
    return ranges


def scored_keys_per_query(length: int, block: int, max_segment_len: int = 0, prompt_both_ways: bool = False) -> float:
    """Keys each query is scored against on average: `length` without blocks."""
    if block <= 0:
        return float(length)
    ranges = key_ranges(length, block, max_segment_len, prompt_both_ways)
    return sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in ranges) / length


def blocked_attention(implementation, q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask, block: int):
    """`implementation` (a dense-mask one) over query blocks, each against its `key_ranges`."""
    L = q_BxLxHxD.shape[1]
    dense = dense_mask(mask)
    outs = [
        implementation(q_BxLxHxD[:, q0:q1], k_BxSxKxD[:, k0:k1], v_BxSxKxD[:, k0:k1], dense[:, q0:q1, k0:k1])
        for q0, q1, k0, k1 in key_ranges(L, block, mask.max_segment_len, mask.prompt_both_ways)
    ]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def dense_mask(mask):
    """The [B, L, S] boolean mask of an `AttentionMask` or of a dense mask itself."""
    return mask.dense_BxLxS if isinstance(mask, AttentionMask) else mask


def xla_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask):
    """Reference attention in plain einsums, f32 softmax; H query heads share K kv heads.
    `mask`: an `AttentionMask` or a boolean [B, L, S] array.

    Heads go in front of the sequence axes before the matmuls, and the softmax is normalised
    after the probability-value product (dividing [.., L, D] instead of [.., L, S]): on
    XLA:CPU this makes forward + backward ~2x faster than the textbook order.
    """
    mask_BxLxS = dense_mask(mask)
    B, L, H, D = q_BxLxHxD.shape
    K = k_BxSxKxD.shape[2]
    q_BxKxGxLxD = (q_BxLxHxD * D**-0.5).reshape(B, L, K, H // K, D).transpose(0, 2, 3, 1, 4)
    k_BxKxSxD = k_BxSxKxD.transpose(0, 2, 1, 3)
    v_BxKxSxD = v_BxSxKxD.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkgld,bksd->bkgls", q_BxKxGxLxD, k_BxKxSxD, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BxLxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    # Every row has at least one allowed key (padding attends to itself), so the max is finite.
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - row_max)
    out = jnp.einsum("bkgls,bksd->bkgld", weights.astype(v_BxSxKxD.dtype), v_BxKxSxD, preferred_element_type=jnp.float32)
    out = out / jnp.sum(weights, axis=-1, keepdims=True)
    return out.astype(v_BxSxKxD.dtype).transpose(0, 3, 1, 2, 4).reshape(B, L, H, D)


def pallas_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask, *, block_q=128, block_k=128, backend=None):
    """Flash attention (`lmjax.kernels.flash_attention`): the mask is computed per block from
    the parts of an `AttentionMask`, never from a dense mask. Triton on GPU, Mosaic on TPU,
    interpret mode elsewhere (correct but slow: for tests, not for training on CPU)."""
    if not isinstance(mask, AttentionMask):
        raise TypeError(
            "pallas attention needs an AttentionMask (segment ids, positions, prompt flags), not a "
            "dense [B, L, S] mask; build it with AttentionMask.packed(...) or AttentionMask.cache(...)."
        )
    from lmjax.kernels.flash_attention import flash_attention

    return flash_attention(
        q_BxLxHxD, k_BxSxKxD, v_BxSxKxD,
        mask.q_segment_ids_BxL, mask.kv_segment_ids_BxS, mask.q_positions_BxL, mask.kv_positions_BxS,
        mask.q_prompt_BxL, mask.kv_prompt_BxS,
        block_q=block_q, block_k=block_k, backend=backend,
    )


def cudnn_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask):
    """`jax.nn.dot_product_attention` with the dense mask: cuDNN's fused kernel on a GPU
    (needs bf16/fp16 activations), its XLA implementation on any other device, so that a
    config naming "cudnn" still runs on a laptop CPU or a TPU."""
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and q_BxLxHxD.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"cudnn attention needs bfloat16 or float16 activations, got {q_BxLxHxD.dtype}; set "
            "model.compute_dtype=bfloat16 or choose implementation.attention=xla."
        )
    dtype = q_BxLxHxD.dtype
    out = jax.nn.dot_product_attention(
        q_BxLxHxD, k_BxSxKxD.astype(dtype), v_BxSxKxD.astype(dtype), mask=dense_mask(mask)[:, None],
        implementation="cudnn" if on_gpu else "xla",
    )
    return out.astype(v_BxSxKxD.dtype)


ATTENTION_IMPLEMENTATIONS = {"xla": xla_attention, "pallas": pallas_attention, "cudnn": cudnn_attention}
# These take a dense mask, so `blocked_attention` can hand them one block's slice of it. (Flash
# kernels skip blocks themselves.)
DENSE_MASK_IMPLEMENTATIONS = ("xla", "cudnn")
# Against a KV cache (generation: a short chunk of queries against every cache slot), these fall
# back to xla: flash tiling gains nothing at decode time.
CACHE_FALLBACK = {"pallas": "xla"}


def attend(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask, implementation: str, *, block: int = 0):
    """Attention [B, L, H, D] by the name of its implementation (`ATTENTION_IMPLEMENTATIONS`).

    `mask`: an `AttentionMask` (any implementation) or a dense boolean [B, L, S] array (xla,
    cudnn). Against a KV cache's slots (a mask from `AttentionMask.cache`) pallas runs xla.
    `block` > 0 skips blocks (module doc) where that is exact and cheaper: a dense-mask
    implementation over packed self-attention; anywhere else the whole square is computed."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention {implementation!r}; choose one of: {', '.join(sorted(ATTENTION_IMPLEMENTATIONS))}."
        )
    if isinstance(mask, AttentionMask) and not mask.self_attention:
        implementation = CACHE_FALLBACK.get(implementation, implementation)
    fn = ATTENTION_IMPLEMENTATIONS[implementation]
    # Only AttentionMask.packed knows the row layout that `key_ranges` relies on.
    packed = isinstance(mask, AttentionMask) and mask.self_attention
    if block > 0 and packed and implementation in DENSE_MASK_IMPLEMENTATIONS:
        return blocked_attention(fn, q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask, block)
    return fn(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask)


class Attention(nn.Module):
    """`wo(attend(qkv(x)))`, the chunk's keys and values written into a KV cache first when
    there is one."""

    dim: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    init_scheme: str
    implementation: str = "xla"
    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32
    block: int = 0  # query rows per block for block skipping; 0 = one block (see the module doc)
    # Builds wq, wk, wv and wo with Projection's signature: where quantized or LoRA weights plug in.
    projection: Callable[..., nn.Module] = Projection

    def qkv(self, x_BxLxE, rope_cos, rope_sin):
        """Queries [B, L, H, D] and keys [B, L, K, D] rotated by RoPE, values [B, L, K, D]."""
        head_dim = self.dim // self.n_heads

        def proj(name, heads):
            return self.projection(
                (self.dim,), (heads, head_dim), ("embed", "heads", "kv"),
                init_for(self.init_scheme, self.dim, self.n_layers, "in"),
                self.param_dtype, self.dtype, name=name,
            )(x_BxLxE)

        q = apply_rope(proj("wq", self.n_heads), rope_cos, rope_sin)
        k = apply_rope(proj("wk", self.n_kv_heads), rope_cos, rope_sin)
        return q, k, proj("wv", self.n_kv_heads)

    @nn.compact
    def __call__(self, x_BxLxE, rope_cos, rope_sin, mask, layer_cache=None, write_slots_BxL=None):
        """Without a cache: self-attention over the L tokens. With `layer_cache` = (cache, layer),
        the whole model's cache (lmjax.models.kv_cache) and this layer's index: the chunk's keys
        and values are written at slots `write_slots_BxL`, the queries attend over the mask's
        slots (all of them, or the first ones that hold anything: see Transformer's
        `attend_slots`), and the updated cache is returned beside the output.

        `mask`: an `AttentionMask` (any implementation; `AttentionMask.cache` with a cache) or
        a dense boolean [B, L, S] array (dense-mask implementations only: xla, cudnn)."""
        q, k, v = self.qkv(x_BxLxE, rope_cos, rope_sin)
        new_cache = None
        if layer_cache is not None:
            cache, layer = layer_cache
            n_slots = mask.kv_positions_BxS.shape[1] if isinstance(mask, AttentionMask) else mask.shape[2]
            k, v, new_cache = cache.update(layer, write_slots_BxL, k, v, n_slots)
            if self.implementation == "pallas" and isinstance(new_cache, PagedKVCache) and q.shape[1] == 1:
                # a decode step reads the pages in the kernel; the gathered k, v go unused (XLA drops them)
                from lmjax.kernels.paged_attention import paged_decode_attention

                out = paged_decode_attention(q[:, 0], new_cache.k[layer], new_cache.v[layer], new_cache.page_table,
                                             mask.q_positions_BxL[:, 0] + 1)
                return self.output(out[:, None]), new_cache
        out = self.output(attend(q, k, v, mask, self.implementation, block=self.block))
        return out if layer_cache is None else (out, new_cache)

    def output(self, out_BxLxHxD):
        """The output projection `wo` of the heads' outputs [B, L, H, D]."""
        return self.projection(
            (self.n_heads, self.dim // self.n_heads), (self.dim,), ("heads", "kv", "embed"),
            init_for(self.init_scheme, self.dim, self.n_layers, "out"),
            self.param_dtype, self.dtype, name="wo",
        )(out_BxLxHxD.astype(self.dtype))
