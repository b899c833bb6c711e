"""Llama-style decoder: token embedding, pre-norm blocks (RoPE GQA attention + SwiGLU), RMSNorm."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models.attention import Attention, AttentionMask
from lmjax.models.layers import Embedding, GatedMLP, Projection, RMSNorm, init_for, record_activation_ms, rope_angles

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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


def _same_kind(cache, k, v):
    """Return (k, v) in the container the caller passed: a plain pair or a NamedTuple cache."""
    return type(cache)(k, v) if hasattr(cache, "_fields") else (k, v)


class Block(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, carry, rope, mask, write_slots_BxL=None):
        """(carry, None), the shape nn.scan wants. carry: x [B, L, E] in training; in generation
        (x, k_all, v_all, layer) with the whole stacked cache, updated and passed on."""
        c = self.cfg
        dt, pdt = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        x_BxLxE, layer_cache = (carry[0], carry[1:]) if isinstance(carry, tuple) else (carry, None)
        attn = Attention(c.dim, c.n_heads, c.n_kv_heads, c.n_layers, c.init, c.attention, pdt, dt,
                         block=c.attention_block, name="attention")
        normed = RMSNorm(c.norm_eps, pdt, dt, name="attention_norm")(x_BxLxE)
        attended = attn(normed, *rope, mask, layer_cache, write_slots_BxL)
        if layer_cache is not None:
            attended, (k_all, v_all) = attended
        h = x_BxLxE + attended
        mlp = GatedMLP(c.dim, c.mlp_hidden, c.n_layers, c.init, nn.silu, pdt, dt, name="mlp")
        out = h + mlp(RMSNorm(c.norm_eps, pdt, dt, name="mlp_norm")(h))
        out = nn.with_logical_constraint(out, ("batch", "length", "embed"))
        if layer_cache is None:
            record_activation_ms(self, out)
            return out, None
        return (out, k_all, v_all, layer_cache[2] + 1), None


class Transformer(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, prompt_BxL=None, cache=None, logits_at_B=None,
                 max_segment_len: int = 0):
        """Logits [B, L, V] in f32. Default: one causal sequence per row starting at position 0.

        `segment_ids_BxL`: packed sequences (0 = padding). `prompt_BxL`: prompt tokens, which
        attend to each other both ways when the config says `prefix_lm` (ignored otherwise).
        `max_segment_len`: a promise that no packed sequence (run of one segment id) is longer,
        which lets block skipping leave out keys further back (0 = no promise). Breaking the
        promise gives wrong outputs; the training loop measures it on the data.

        Generation: `cache` = (k, v), each [layers, B, S, kv_heads, head_dim]. The L tokens of
        each row are a chunk at `positions_BxL` (required), written into cache slots equal to
        their positions where `segment_ids_BxL` is non-zero. Returns (logits, updated cache).
        `logits_at_B` picks one position per row: logits are then [B, V].
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
            cache_len = cache[0].shape[2]
            mask = AttentionMask.cache(positions_BxL, cache_len, prompt_BxL)
            write_slots_BxL = jnp.where(segment_ids_BxL != 0, positions_BxL, cache_len)
        rope = rope_angles(positions_BxL, c.dim // c.n_heads, c.rope_base)

        embed = Embedding(c.vocab_size, c.dim, init_for(c.init, c.dim, c.n_layers, "embed"), pdt, dt, name="embed")
        x = nn.with_logical_constraint(embed(tokens_BxL), ("batch", "length", "embed"))

        block = Block
        if REMAT_POLICIES[c.remat] is not None or c.remat == "full":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
        carry = x if cache is None else (x, cache[0], cache[1], jnp.zeros((), jnp.int32))
        if not c.scan_layers:
            for i in range(c.n_layers):
                carry, _ = block(c, name=f"layer_{i}")(carry, rope, mask, write_slots_BxL)
        else:
            layers = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, name="layers")
            carry, _ = layers(carry, rope, mask, write_slots_BxL)
        x, new_cache = (carry, None) if cache is None else (carry[0], _same_kind(cache, carry[1], carry[2]))
        if logits_at_B is not None:
            x = x[jnp.arange(B), logits_at_B][:, None, :]
        x = RMSNorm(c.norm_eps, pdt, dt, name="final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            head_init = init_for(c.init, c.dim, c.n_layers, "in")
            logits = Projection((c.dim,), (c.vocab_size,), ("embed", "vocab"), head_init, pdt, dt, name="lm_head")(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        if logits_at_B is not None:
            logits = logits[:, 0]
        return logits if cache is None else (logits, new_cache)
