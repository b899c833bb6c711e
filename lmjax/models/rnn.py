"""Linear recurrent networks: Hawk (RG-LRU, De et al. 2024), minGRU and minLSTM (Feng et al. 2024).

Every cell is a linear recurrence in its state, `h_t = a_t * h_{t-1} + b_t`, with a_t, b_t
computed from the input only, so training runs it as a parallel (associative) scan and
generation as one step a token. Each layer is two pre-norm residual blocks, as in Hawk:

  recurrent block: gate = gelu(W_gate x); u = W_in x; u = causal conv1d(u) (width d_conv, 0 =
                   none); h = cell(u, x); out = W_out(h * gate)
  MLP block:       W_down(gelu(W_gate x) * W_up x)  (GeGLU)

Cells (state h: [B, width]):
  hawk     r = sigmoid(W_a u + b_a), i = sigmoid(W_i u + b_i), a = sigmoid(lambda)^(c r) (c = 8),
           h = a h + sqrt(1 - a^2) (i u)
  mingru   z = sigmoid(W_z x), h = (1 - z) h + z u                  (u = W_in x is h~)
  minlstm  f, i = sigmoid(W_f x), sigmoid(W_i x); f, i = f/(f+i), i/(f+i); h = f h + i u

Simplified from the papers: Hawk's block-diagonal gate matrices are dense, and the
sqrt(1 - a^2) normalisation is kept at segment starts (recurrentgemma drops it there); minGRU
and minLSTM use the plain (not log-space) form and share Hawk's gated block and MLP.

Packed rows: a = 0 where the segment id changes (state and conv window reset).

Generation state (stacked on a leading layers axis), `RNNState`:
  conv [n_layers, B, d_conv-1, width], h [n_layers, B, width] (f32).
`model.cache_spec(lanes)` describes it, `model.init_state(batch)` gives zeros;
`model.apply(v, tokens_B, state, method="step")` -> (logits [B, V], state).
"""
import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models.cache_spec import CacheLeaf
from lmjax.models.layers import GatedMLP, Projection, RMSNorm, init_for, record_activation_ms
from lmjax.models.recurrent import RecurrentLM
from lmjax.models.scans import LINEAR_SCANS, causal_conv, linear_scan

CELLS = ("hawk", "mingru", "minlstm")


@dataclasses.dataclass(frozen=True)
class RNNConfig:
    vocab_size: int
    dim: int
    n_layers: int
    cell: str = "hawk"  # hawk | mingru | minlstm
    width: int = 0  # recurrence width; 0 = dim
    d_conv: int = 4  # temporal conv width before the cell; 0 = none
    mlp_hidden: int = 0  # 0 = 3 * dim (Hawk's GeGLU expansion)
    hawk_c: float = 8.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init: str = "normal"
    remat: str = "none"
    scan: str = "associative"  # sequential | associative | chunked
    chunk_size: int = 64
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    scan_layers: bool = True

    @property
    def rnn_width(self):
        return self.width or self.dim

    @property
    def hidden(self):
        return self.mlp_hidden or 3 * self.dim


class RNNState(NamedTuple):
    conv: jax.Array  # [n_layers, B, d_conv-1, width]
    h: jax.Array  # [n_layers, B, width], f32


def _hawk_lambda_init(c):
    """lambda such that a^c = sigmoid(lambda)^c is uniform in [0.9, 0.999] (Griffin)."""
    def init(key, shape, dtype=jnp.float32):
        a_c = jax.random.uniform(key, shape, jnp.float32, 0.9, 0.999)
        a = a_c ** (1.0 / c)
        return (jnp.log(a) - jnp.log1p(-a)).astype(dtype)

    return init


class RecurrentMixer(nn.Module):
    cfg: RNNConfig

    @nn.compact
    def __call__(self, x_BxLxE, reset_BxL, state, hold_BxL=None):
        c = self.cfg
        dt, pdt = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        B, W, K = x_BxLxE.shape[0], c.rnn_width, c.d_conv
        init_in = init_for(c.init, c.dim, c.n_layers, "in")
        proj = lambda n_in, axes, name, init=init_in: Projection((n_in,), (W,), axes, init, pdt, dt, name=name)
        param = lambda name, init, shape, axes: self.param(name, nn.with_logical_partitioning(init, axes), shape, pdt)
        gate = nn.gelu(proj(c.dim, ("embed", "mlp"), "w_gate")(x_BxLxE))
        u = proj(c.dim, ("embed", "mlp"), "w_in")(x_BxLxE)
        conv_window, h0 = state if state is not None else (jnp.zeros((B, max(K - 1, 0), W), dt), jnp.zeros((B, W), jnp.float32))
        if K > 0:
            conv_kernel = param("conv_kernel", nn.initializers.normal(K**-0.5), (K, W), ("conv", "mlp"))
            conv_bias = param("conv_bias", nn.initializers.zeros, (W,), ("mlp",))
            u, conv_window = causal_conv(u, conv_kernel, conv_bias, reset_BxL, conv_window, hold_BxL)
        u = nn.with_logical_constraint(u, ("batch", "length", "mlp"))
        u32 = u.astype(jnp.float32)

        if c.cell == "hawk":
            init_u = init_for(c.init, W, c.n_layers, "in")
            r = jax.nn.sigmoid(proj(W, ("rnn_in", "mlp"), "w_a", init_u)(u).astype(jnp.float32)
                               + param("b_a", nn.initializers.zeros, (W,), ("mlp",)))
            i = jax.nn.sigmoid(proj(W, ("rnn_in", "mlp"), "w_i", init_u)(u).astype(jnp.float32)
                               + param("b_i", nn.initializers.zeros, (W,), ("mlp",)))
            lam = param("lambda", _hawk_lambda_init(c.hawk_c), (W,), ("mlp",)).astype(jnp.float32)
            log_a = -c.hawk_c * r * jax.nn.softplus(-lam)  # log(sigmoid(lambda)^(c r))
            a = jnp.exp(log_a)
            b = jnp.sqrt(-jnp.expm1(2 * log_a)) * (i * u32)
        elif c.cell == "mingru":
            z = jax.nn.sigmoid(proj(c.dim, ("embed", "mlp"), "w_z")(x_BxLxE).astype(jnp.float32))
            a, b = 1 - z, z * u32
        elif c.cell == "minlstm":
            f = jax.nn.sigmoid(proj(c.dim, ("embed", "mlp"), "w_f")(x_BxLxE).astype(jnp.float32))
            i = jax.nn.sigmoid(proj(c.dim, ("embed", "mlp"), "w_i")(x_BxLxE).astype(jnp.float32))
            a, b = f / (f + i), i / (f + i) * u32
        else:
            raise ValueError(f"Unknown cell {c.cell!r} in model.cell; choose one of: {', '.join(CELLS)}.")

        h, h_last = linear_scan(a, b, h0, reset_BxL, c.scan, c.chunk_size, hold_BxL)
        y = nn.with_logical_constraint(h.astype(dt) * gate, ("batch", "length", "mlp"))
        out = Projection((W,), (c.dim,), ("mlp", "embed"), init_for(c.init, W, c.n_layers, "out"), pdt, dt, name="w_out")(y)
        return out, (conv_window, h_last)


class RNNBlock(nn.Module):
    cfg: RNNConfig

    @nn.compact
    def __call__(self, x_BxLxE, reset_BxL, state, hold_BxL=None):
        c = self.cfg
        dt, pdt = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        normed = RMSNorm(c.norm_eps, pdt, dt, name="recurrent_norm")(x_BxLxE)
        mixed, new_state = RecurrentMixer(c, name="recurrent")(normed, reset_BxL, state, hold_BxL)
        h = x_BxLxE + mixed
        mlp = GatedMLP(c.dim, c.hidden, c.n_layers, c.init, nn.gelu, pdt, dt, name="mlp")  # GeGLU, as Hawk
        out = h + mlp(RMSNorm(c.norm_eps, pdt, dt, name="mlp_norm")(h))
        out = nn.with_logical_constraint(out, ("batch", "length", "embed"))
        record_activation_ms(self, out)
        return out, (None if state is None else RNNState(*new_state))


class RNN(RecurrentLM):
    cfg: RNNConfig
    block = RNNBlock
    state_type = RNNState

    def cache_spec(self, lanes: int, max_len: int = 0, dtype=None) -> RNNState:
        """The generation cache, the state as CacheLeafs: constant in size per lane whatever
        `max_len`; the conv window in `dtype` (default: the compute dtype), the hidden state in f32."""
        c = self.cfg
        W, dtype = c.rnn_width, jnp.dtype(dtype or c.compute_dtype)
        return RNNState(
            conv=CacheLeaf((c.n_layers, lanes, max(c.d_conv - 1, 0), W), dtype, ("layers", "batch", "conv", "mlp")),
            h=CacheLeaf((c.n_layers, lanes, W), jnp.float32, ("layers", "batch", "mlp")),
        )


def check_config(cfg: RNNConfig):
    if cfg.cell not in CELLS:
        raise ValueError(f"Unknown cell {cfg.cell!r} in model.cell; choose one of: {', '.join(CELLS)}.")
    if cfg.scan not in LINEAR_SCANS:
        raise ValueError(f"Unknown scan {cfg.scan!r} in model.scan; choose one of: {', '.join(LINEAR_SCANS)}.")
