"""Building blocks shared by the model families: projections, norms, embeddings, RoPE, the output
head, and the stacking of layers (remat, nn.scan).

Every parameter is created through `nn.with_logical_partitioning`, so it carries logical axis
names (see lmjax.parallel) and the parallel layout is a rules-table change, not a model change.
"""
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.quant.qarray import QuantizedArray

Initializer = Callable[..., jax.Array]

# `model.remat` names: what a layer keeps for the backward pass (None: everything, no remat).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def init_for(scheme: str, fan_in: int, n_layers: int, role: str) -> Initializer:
    """Weight initializer for a parameter of a given role ('in', 'out', 'embed', 'head').

    'normal': GPT-2 style, std 0.02, with output projections (those writing into the residual
    stream) scaled by 1/sqrt(2 * n_layers) so the residual variance does not grow with depth.
    'fan_in': std 1/sqrt(fan_in) (LeCun), embeddings std 1; outputs scaled like 'normal'.
    """
    if scheme == "normal":
        std = 0.02
    elif scheme == "fan_in":
        std = 1.0 if role == "embed" else fan_in**-0.5
    else:
        raise ValueError(f"Unknown init scheme {scheme!r}; choose one of: fan_in, normal.")
    if role == "out":
        std /= (2 * n_layers) ** 0.5
    return nn.initializers.normal(stddev=std)


class Projection(nn.Module):
    """A linear map contracting the trailing `len(in_shape)` axes into `out_shape`.

    The single place where weights meet activations, so quantized or LoRA variants can replace it.
    """

    in_shape: Sequence[int]
    out_shape: Sequence[int]
    axes: Sequence[str]  # logical names of the kernel: in axes then out axes
    kernel_init: Initializer  # not `init`: a field of that name would shadow nn.Module.init
    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel_shape = tuple(self.in_shape) + tuple(self.out_shape)
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.axes)), kernel_shape, self.param_dtype
        )
        # One 2-D matmul over flattened leading axes: XLA:CPU lays out the backward pass far
        # better this way (about 2.5x faster on the MLP) than with batched N-D contractions.
        n_in = len(self.in_shape)
        lead = x.shape[: x.ndim - n_in]
        x_2d = x.reshape((-1, math.prod(self.in_shape))).astype(self.dtype)
        if self.is_mutable_collection("quant_stats"):  # calibration (lmjax.quant): the inputs' Gram matrix
            x32 = x_2d.astype(jnp.float32)
            self.sow("quant_stats", "input_gram", x32.T @ x32)
        if isinstance(kernel, QuantizedArray):  # weight-only quantized: dequantized here, inside the jit
            kernel = kernel.dequantize(self.dtype)
        kernel_2d = kernel.reshape((math.prod(self.in_shape), -1)).astype(self.dtype)
        return (x_2d @ kernel_2d).reshape(lead + tuple(self.out_shape))


class GatedMLP(nn.Module):
    """`w_down(activation(w_gate x) * w_up x)`: SwiGLU (Llama) or GeGLU (Hawk) by `activation`."""

    dim: int
    hidden: int
    n_layers: int
    init_scheme: str
    activation: Callable = nn.silu
    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxE):
        pdt, dt = self.param_dtype, self.dtype
        init_in = init_for(self.init_scheme, self.dim, self.n_layers, "in")
        gate = Projection((self.dim,), (self.hidden,), ("embed", "mlp"), init_in, pdt, dt, name="w_gate")(x_BxLxE)
        up = Projection((self.dim,), (self.hidden,), ("embed", "mlp"), init_in, pdt, dt, name="w_up")(x_BxLxE)
        hidden = nn.with_logical_constraint(self.activation(gate) * up, ("batch", "length", "mlp"))
        init_out = init_for(self.init_scheme, self.hidden, self.n_layers, "out")
        return Projection((self.hidden,), (self.dim,), ("mlp", "embed"), init_out, pdt, dt, name="w_down")(hidden)


class RMSNorm(nn.Module):
    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


class Embedding(nn.Module):
    vocab_size: int
    dim: int
    embedding_init: Initializer  # not `init`: a field of that name would shadow nn.Module.init
    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.vocab_size, self.dim),
            self.param_dtype,
        )

    def __call__(self, tokens_BxL):
        if isinstance(self.embedding, QuantizedArray):  # dequantize only the rows looked up
            return self.embedding.take_rows(tokens_BxL).dequantize(self.dtype)
        return jnp.take(self.embedding, tokens_BxL, axis=0).astype(self.dtype)

    def attend(self, x_BxLxD):
        """Logits against the embedding matrix (tied output head)."""
        embedding = self.embedding
        if isinstance(embedding, QuantizedArray):
            embedding = embedding.dequantize(self.dtype)
        return jnp.einsum("bld,vd->blv", x_BxLxD, embedding.astype(self.dtype))


def rope_angles(positions_BxL, head_dim: int, base: float):
    """(cos, sin), each [B, L, head_dim/2] in f32, for rotary embeddings at the given positions."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxLxHxD, cos_BxLxR, sin_BxLxR):
    """Rotate pairs (i, i + D/2) of each head vector (the 'rotate half' layout used by HF Llama)."""
    x1, x2 = jnp.split(x_BxLxHxD.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_BxLxR[:, :, None, :], sin_BxLxR[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxHxD.dtype)


def record_activation_ms(module: nn.Module, x_BxLxE):
    """Sow each token's mean square over features ([B, L], f32) as `activation_ms` in the
    'intermediates' collection, for the training probes (lmjax.monitor.probes). A no-op unless
    the caller applies the model with `mutable=["intermediates"]`; XLA then drops the reduction."""
    module.sow("intermediates", "activation_ms", jnp.mean(jnp.square(x_BxLxE.astype(jnp.float32)), axis=-1))


def lm_head(cfg, embed: Embedding, x_BxLxE, logits_at_B=None):
    """Final RMSNorm and output head, tied to `embed` or a `lm_head` projection; logits in f32,
    [B, L, V], or [B, V] at position `logits_at_B[b]` of each row (only those are projected).

    A function, not a module, called from a model's compact `__call__`: `final_norm` and
    `lm_head` stay parameters of the model itself, where checkpoints and importers expect them.
    `cfg`: any family's config (vocab_size, dim, n_layers, norm_eps, init, tie_embeddings, dtypes).
    """
    dt, pdt = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    if logits_at_B is not None:
        x_BxLxE = x_BxLxE[jnp.arange(x_BxLxE.shape[0]), logits_at_B][:, None, :]
    x_BxLxE = RMSNorm(cfg.norm_eps, pdt, dt, name="final_norm")(x_BxLxE)
    if cfg.tie_embeddings:
        logits = embed.attend(x_BxLxE)
    else:
        head_init = init_for(cfg.init, cfg.dim, cfg.n_layers, "in")
        logits = Projection((cfg.dim,), (cfg.vocab_size,), ("embed", "vocab"), head_init, pdt, dt, name="lm_head")(x_BxLxE)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits[:, 0] if logits_at_B is not None else logits


def remat_block(block_cls, remat: str):
    """`block_cls` recomputed in the backward pass under the policy `REMAT_POLICIES[remat]`."""
    policy = REMAT_POLICIES[remat]
    return block_cls if policy is None else nn.remat(block_cls, policy=policy, prevent_cse=False)


def scanned_layers(block_cls, cfg, in_axes):
    """`cfg.n_layers` blocks `block_cls(cfg)` as one `nn.scan` named "layers" (call it from a
    compact `__call__`): the carry goes through the layers, parameters and sown intermediates
    are stacked on a leading "layers" axis, each layer initialised from its own key. `in_axes`:
    for the arguments after the carry, `nn.broadcast` (shared) or 0 (one slice per layer). One
    compiled layer whatever the depth."""
    return nn.scan(
        block_cls,
        variable_axes={"params": 0, "intermediates": 0, "quant_stats": 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, name="layers")
