"""Llama-style decoder: token embedding, pre-norm blocks (RoPE GQA attention + SwiGLU), RMSNorm,
and its generation cache (lmjax.models.kv_cache, described by `Transformer.cache_spec`)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models.attention import Attention, AttentionMask
from lmjax.models.cache_spec import CacheLeaf
from lmjax.models.kv_cache import KV_CACHE_AXES, PAGE_TABLE_AXES, PAGED_KV_AXES, KVCache, PagedKVCache
from lmjax.models.layers import (
    Embedding, GatedMLP, RMSNorm, init_for, lm_head, record_activation_ms, remat_block, rope_angles,
    scanned_layers,
)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden: int
    tie_embeddings: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init: str = "normal"
    remat: str = "none"
    attention: str = "xla"
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    scan_layers: bool = True
    prefix_lm: bool = False  # prompt tokens attend to each other both ways
    attention_block: int = 0  # block skipping (lmjax.models.attention): query rows per block, 0 = off


class Block(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, carry, rope, mask, write_slots_BxL=None):
        """(carry, None), the shape nn.scan wants. carry: x [B, L, E] in training; in generation
        (x, cache, layer) with the whole model's cache, updated and passed on."""
        c = self.cfg
        dt, pdt = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        x_BxLxE, layer_cache = (carry[0], carry[1:]) if isinstance(carry, tuple) else (carry, None)
        attn = Attention(c.dim, c.n_heads, c.n_kv_heads, c.n_layers, c.init, c.attention, pdt, dt,
                         block=c.attention_block, name="attention")
        normed = RMSNorm(c.norm_eps, pdt, dt, name="attention_norm")(x_BxLxE)
        attended = attn(normed, *rope, mask, layer_cache, write_slots_BxL)
        if layer_cache is not None:
            attended, cache = attended
        h = x_BxLxE + attended
        mlp = GatedMLP(c.dim, c.mlp_hidden, c.n_layers, c.init, nn.silu, pdt, dt, name="mlp")
        out = h + mlp(RMSNorm(c.norm_eps, pdt, dt, name="mlp_norm")(h))
        out = nn.with_logical_constraint(out, ("batch", "length", "embed"))
        if layer_cache is None:
            record_activation_ms(self, out)
            return out, None
        return (out, cache, layer_cache[1] + 1), None


class Transformer(nn.Module):
    cfg: TransformerConfig
    # The decoder may pass `attend_slots`: attention over the filled part of the KV cache only.
    ATTEND_SLOTS = True
    PAGED_CACHE = True  # cache_spec(..., page_size=...) gives a PagedKVCache

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, prompt_BxL=None, cache=None, logits_at_B=None,
                 max_segment_len: int = 0, attend_slots: int = 0):
        """Logits [B, L, V] in f32. Default: one causal sequence per row starting at position 0.

        `segment_ids_BxL`: packed sequences (0 = padding). `prompt_BxL`: prompt tokens, which
        attend to each other both ways when the config says `prefix_lm` (ignored otherwise).
        `max_segment_len`: a promise that no packed sequence (run of one segment id) is longer,
        which lets block skipping leave out keys further back (0 = no promise). Breaking the
        promise gives wrong outputs; the training loop measures it on the data.

        Generation: `cache` is a `KVCache` or `PagedKVCache` of `cache_spec` (lmjax.models.kv_cache)
        of S = `cache.max_len` slots per lane. The L tokens of
        each row are a chunk at `positions_BxL` (required), written into cache slots equal to
        their positions where `segment_ids_BxL` is non-zero. Returns (logits, updated cache).
        `logits_at_B` picks one position per row: logits are then [B, V]. `attend_slots` > 0:
        the queries attend over the first `attend_slots` slots only (a promise that no query's
        position reaches past them: the decoder attends over the filled part of the cache).
        """
        c = self.cfg
        dt, pdt = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        B, L = tokens_BxL.shape
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones((B, L), jnp.int32)
        if not c.prefix_lm:
            prompt_BxL = None
        if cache is None:
            mask, write_slots_BxL = AttentionMask.packed(segment_ids_BxL, prompt_BxL, max_segment_len), None
        else:
            cache_len = cache.max_len
            mask = AttentionMask.cache(positions_BxL, min(attend_slots or cache_len, cache_len), prompt_BxL)
            write_slots_BxL = jnp.where(segment_ids_BxL != 0, positions_BxL, cache_len)
        rope = rope_angles(positions_BxL, c.dim // c.n_heads, c.rope_base)

        embed = Embedding(c.vocab_size, c.dim, init_for(c.init, c.dim, c.n_layers, "embed"), pdt, dt, name="embed")
        x = nn.with_logical_constraint(embed(tokens_BxL), ("batch", "length", "embed"))

        block = remat_block(Block, c.remat)
        carry = x if cache is None else (x, cache, jnp.zeros((), jnp.int32))
        if not c.scan_layers:
            for i in range(c.n_layers):
                carry, _ = block(c, name=f"layer_{i}")(carry, rope, mask, write_slots_BxL)
        else:
            layers = scanned_layers(block, c, in_axes=(nn.broadcast, nn.broadcast, nn.broadcast))
            carry, _ = layers(carry, rope, mask, write_slots_BxL)
        x, new_cache = (carry, None) if cache is None else carry[:2]
        logits = lm_head(c, embed, x, logits_at_B)
        return logits if cache is None else (logits, new_cache)

    def cache_spec(self, lanes: int, max_len: int, dtype=None, *, page_size: int = 0, n_pages: int = 0):
        """The generation cache as CacheLeafs, in `dtype` (default: the compute dtype): a
        `KVCache` of `max_len` slots per lane, or with `page_size` a `PagedKVCache` of `n_pages`
        pages and a page table covering `max_len` slots per lane (a multiple of `page_size`)."""
        c = self.cfg
        dtype = jnp.dtype(dtype or c.compute_dtype)
        head = (c.n_kv_heads, c.dim // c.n_heads)
        if not page_size:
            leaf = CacheLeaf((c.n_layers, lanes, max_len, *head), dtype, KV_CACHE_AXES)
            return KVCache(leaf, leaf)
        if max_len % page_size:
            raise ValueError(f"max_len={max_len} must be a multiple of page_size={page_size}.")
        pages = CacheLeaf((c.n_layers, c.n_kv_heads, n_pages, page_size, c.dim // c.n_heads), dtype, PAGED_KV_AXES)
        table = CacheLeaf((lanes, max_len // page_size), jnp.int32, PAGE_TABLE_AXES)
        return PagedKVCache(pages, pages, table)
