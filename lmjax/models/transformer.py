"""Llama-style decoder: token embedding, pre-norm blocks (RoPE GQA attention + SwiGLU), RMSNorm."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models.attention import Attention
from lmjax.models.layers import Embedding, Projection, RMSNorm, init_for, rope_angles
from lmjax.models.masks import attention_mask

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


class MLP(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_BxLxE):
        c = self.cfg
        dt, pdt = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        init_in = init_for(c.init, c.dim, c.n_layers, "in")
        gate = Projection((c.dim,), (c.mlp_hidden,), ("embed", "mlp"), init_in, pdt, dt, name="w_gate")(x_BxLxE)
        up = Projection((c.dim,), (c.mlp_hidden,), ("embed", "mlp"), init_in, pdt, dt, name="w_up")(x_BxLxE)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        init_out = init_for(c.init, c.mlp_hidden, c.n_layers, "out")
        return Projection((c.mlp_hidden,), (c.dim,), ("mlp", "embed"), init_out, pdt, dt, name="w_down")(hidden)


class Block(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_BxLxE, rope, mask_BxLxS):
        c = self.cfg
        dt, pdt = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        attn = Attention(c.dim, c.n_heads, c.n_kv_heads, c.n_layers, c.init, c.attention, pdt, dt, name="attention")
        h = x_BxLxE + attn(RMSNorm(c.norm_eps, pdt, dt, name="attention_norm")(x_BxLxE), *rope, mask_BxLxS)
        out = h + MLP(c, name="mlp")(RMSNorm(c.norm_eps, pdt, dt, name="mlp_norm")(h))
        return nn.with_logical_constraint(out, ("batch", "length", "embed")), None


class Transformer(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, prompt_BxL=None):
        """Logits [B, L, V] in f32. Default: one causal sequence per row starting at position 0."""
        c = self.cfg
        dt, pdt = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        B, L = tokens_BxL.shape
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones((B, L), jnp.int32)
        mask_BxLxS = attention_mask(segment_ids_BxL, prompt_BxL)
        rope = rope_angles(positions_BxL, c.dim // c.n_heads, c.rope_base)

        embed = Embedding(c.vocab_size, c.dim, init_for(c.init, c.dim, c.n_layers, "embed"), pdt, dt, name="embed")
        x = nn.with_logical_constraint(embed(tokens_BxL), ("batch", "length", "embed"))

        block = Block
        if REMAT_POLICIES[c.remat] is not None or c.remat == "full":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
        if not c.scan_layers:
            for i in range(c.n_layers):
                x, _ = block(c, name=f"layer_{i}")(x, rope, mask_BxLxS)
        else:
          layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=c.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
          )(c, name="layers")
          x, _ = layers(x, rope, mask_BxLxS)
        x = RMSNorm(c.norm_eps, pdt, dt, name="final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            head_init = init_for(c.init, c.dim, c.n_layers, "in")
            logits = Projection((c.dim,), (c.vocab_size,), ("embed", "vocab"), head_init, pdt, dt, name="lm_head")(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
