"""Grouped-query self-attention with RoPE; the attention math itself is chosen by name."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models.layers import Projection, apply_rope, init_for


def xla_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxLxS):
    """Reference attention in plain einsums; softmax in f32. H query heads share K kv heads."""
    B, L, H, D = q_BxLxHxD.shape
    K = k_BxSxKxD.shape[2]
    q_BxLxKxGxD = q_BxLxHxD.reshape(B, L, K, H // K, D)
    scores = jnp.einsum("blkgd,bskd->bkgls", q_BxLxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32)
    scores = scores * D**-0.5
    scores = jnp.where(mask_BxLxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxD.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v_BxSxKxD)
    return out.reshape(B, L, H, D)


ATTENTION_IMPLEMENTATIONS = {"xla": xla_attention}


class Attention(nn.Module):
    dim: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    init_scheme: str
    implementation: str = "xla"
    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxE, rope_cos, rope_sin, mask_BxLxS):
        head_dim = self.dim // self.n_heads

        def proj(name, heads):
            return Projection(
                (self.dim,), (heads, head_dim), ("embed", "heads", "kv"),
                init_for(self.init_scheme, self.dim, self.n_layers, "in"),
                self.param_dtype, self.dtype, name=name,
            )(x_BxLxE)

        q = apply_rope(proj("wq", self.n_heads), rope_cos, rope_sin)
        k = apply_rope(proj("wk", self.n_kv_heads), rope_cos, rope_sin)
        v = proj("wv", self.n_kv_heads)
        out_BxLxHxD = ATTENTION_IMPLEMENTATIONS[self.implementation](q, k, v, mask_BxLxS)
        return Projection(
            (self.n_heads, head_dim), (self.dim,), ("heads", "kv", "embed"),
            init_for(self.init_scheme, self.dim, self.n_layers, "out"),
            self.param_dtype, self.dtype, name="wo",
        )(out_BxLxHxD)
