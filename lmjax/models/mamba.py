"""Mamba (selective state-space model): embedding, pre-norm residual Mamba blocks, RMSNorm, head.

Each block mixes tokens with a selective SSM (Gu & Dao, 2023): the normed input is projected to
x and a gate z ([B, L, expand*dim]); x goes through a depthwise causal conv1d (width d_conv) and
SiLU; input-dependent dt = softplus(low-rank projection + bias), B and C come from x; the SSM
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,   y_t = C_t . h_t + D x_t,   A = -exp(A_log)
runs per channel with an N = d_state state; y * silu(z) is projected back to dim.

Packed rows: where the segment id changes the SSM state and the conv window reset, so a packed
row computes exactly what its sequences would separately.

Generation state (per layer, stacked on a leading layers axis), `MambaState`:
  conv [n_layers, B, d_conv-1, d_inner]  the last d_conv-1 conv inputs
  ssm  [n_layers, B, d_inner, d_state]   the SSM state (f32)
`model.cache_spec(lanes)` describes it, `model.init_state(batch)` gives zeros;
`model.apply(v, tokens_B, state, method="step")` ->
(logits [B, V], state); `model.apply(v, tokens_BxL, state=state)` runs a chunk (prefill) and
returns (logits, state).
"""
import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models.cache_spec import CacheLeaf
from lmjax.models.layers import Projection, RMSNorm, init_for, record_activation_ms
from lmjax.models.recurrent import RecurrentLM
from lmjax.models.scans import SSM_SCANS, causal_conv, selective_scan


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 = ceil(dim / 16), as in Mamba
    dt_min: float = 1e-3
    dt_max: float = 0.1
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init: str = "normal"
    remat: str = "none"
    scan: str = "chunked"  # sequential | chunked | pallas
    chunk_size: int = 64
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    scan_layers: bool = True

    @property
    def d_inner(self):
        return self.expand * self.dim

    @property
    def rank(self):
        return self.dt_rank or math.ceil(self.dim / 16)


class MambaState(NamedTuple):
    conv: jax.Array  # [n_layers, B, d_conv-1, d_inner]
    ssm: jax.Array  # [n_layers, B, d_inner, d_state], f32


def _dt_bias_init(dt_min, dt_max):
    """Bias whose softplus is dt ~ log-uniform in [dt_min, dt_max] (Mamba's dt initialisation)."""
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), 1e-4)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _a_log_init(key, shape, dtype=jnp.float32):
    """S4D-real: A[d, n] = -(n + 1)."""
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)


class MambaMixer(nn.Module):
    cfg: MambaConfig

    @nn.compact
    def __call__(self, x_BxLxE, reset_BxL, state, hold_BxL=None):
        c = self.cfg
        dt, pdt = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        B = x_BxLxE.shape[0]
        D, N, K, R = c.d_inner, c.d_state, c.d_conv, c.rank
        init_in = init_for(c.init, c.dim, c.n_layers, "in")
        x = Projection((c.dim,), (D,), ("embed", "mlp"), init_in, pdt, dt, name="in_x")(x_BxLxE)
        z = Projection((c.dim,), (D,), ("embed", "mlp"), init_in, pdt, dt, name="in_z")(x_BxLxE)
        x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))

        param = lambda name, init, shape, axes: self.param(name, nn.with_logical_partitioning(init, axes), shape, pdt)
        conv_kernel = param("conv_kernel", nn.initializers.normal(K**-0.5), (K, D), ("conv", "mlp"))
        conv_bias = param("conv_bias", nn.initializers.zeros, (D,), ("mlp",))
        conv_window, h0 = state if state is not None else (jnp.zeros((B, K - 1, D), dt), jnp.zeros((B, D, N), jnp.float32))
        x, conv_window = causal_conv(x, conv_kernel, conv_bias, reset_BxL, conv_window, hold_BxL)
        x = nn.silu(x)

        init_inner = init_for(c.init, D, c.n_layers, "in")
        dt_low = Projection((D,), (R,), ("mlp", "rank"), init_inner, pdt, dt, name="x_dt")(x)
        B_BxLxN = Projection((D,), (N,), ("mlp", "state"), init_inner, pdt, dt, name="x_B")(x)
        C_BxLxN = Projection((D,), (N,), ("mlp", "state"), init_inner, pdt, dt, name="x_C")(x)
        dt_init = nn.initializers.uniform(2 * R**-0.5)
        delta = Projection((R,), (D,), ("rank", "mlp"), lambda k, s, d: dt_init(k, s, d) - R**-0.5, pdt, dt, name="dt_proj")(dt_low)
        dt_bias = param("dt_bias", _dt_bias_init(c.dt_min, c.dt_max), (D,), ("mlp",))
        delta = jax.nn.softplus(delta.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        if hold_BxL is not None:  # a step of zero length leaves the state as it is
            delta = jnp.where(hold_BxL[..., None], 0.0, delta)
        A = -jnp.exp(param("A_log", _a_log_init, (D, N), ("mlp", "state")).astype(jnp.float32))
        skip = param("D", nn.initializers.ones, (D,), ("mlp",))

        y, h_last = selective_scan(x, delta, A, B_BxLxN, C_BxLxN, reset_BxL, h0, c.scan, c.chunk_size)
        y = (y + x.astype(jnp.float32) * skip.astype(jnp.float32)).astype(dt) * nn.silu(z)
        y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
        out = Projection((D,), (c.dim,), ("mlp", "embed"), init_for(c.init, D, c.n_layers, "out"), pdt, dt, name="out")(y)
        return out, (conv_window, h_last)


class MambaBlock(nn.Module):
    cfg: MambaConfig

    @nn.compact
    def __call__(self, x_BxLxE, reset_BxL, state, hold_BxL=None):
        """(x, state) -> (x, state): the shape nn.scan over layers wants."""
        c = self.cfg
        dt, pdt = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        normed = RMSNorm(c.norm_eps, pdt, dt, name="norm")(x_BxLxE)
        mixed, new_state = MambaMixer(c, name="mixer")(normed, reset_BxL, state, hold_BxL)
        out = nn.with_logical_constraint(x_BxLxE + mixed, ("batch", "length", "embed"))
        record_activation_ms(self, out)
        return out, (None if state is None else MambaState(*new_state))


class Mamba(RecurrentLM):
    cfg: MambaConfig
    block = MambaBlock
    state_type = MambaState

    def cache_spec(self, lanes: int, max_len: int = 0, dtype=None) -> MambaState:
        """The generation cache, the state as CacheLeafs: constant in size per lane whatever
        `max_len`; the conv window in `dtype` (default: the compute dtype), the SSM state in f32."""
        c = self.cfg
        dtype = jnp.dtype(dtype or c.compute_dtype)
        return MambaState(
            conv=CacheLeaf((c.n_layers, lanes, c.d_conv - 1, c.d_inner), dtype, ("layers", "batch", "conv", "mlp")),
            ssm=CacheLeaf((c.n_layers, lanes, c.d_inner, c.d_state), jnp.float32, ("layers", "batch", "mlp", "state")),
        )


def check_config(cfg: MambaConfig):
    if cfg.scan not in SSM_SCANS:
        raise ValueError(f"Unknown scan {cfg.scan!r} in model.scan; choose one of: {', '.join(SSM_SCANS)}.")
