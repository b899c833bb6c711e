"""Mamba's selective scan as a Pallas kernel, with its `lax.scan` reference.

    h_t = exp(dt_t * A) * keep_t * h_{t-1} + (dt_t * x_t) B_t,     y_t = h_t . C_t

per channel d (state [D, N]); `keep_t` is 0 where a packed segment starts (the state resets).
The kernel runs one program per (row, block of channels) and walks time with the state held
on chip, so the [B, L, D, N] tensors of a parallel scan are never written to memory.

Backward: `jax.custom_vjp` whose backward pass is the VJP of the reference scan (`lax.scan`,
recomputing the states), not a reverse-time kernel yet.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def selective_scan_reference(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN, keep_BxL, h0_BxDxN):
    """(y [B, L, D], last state [B, D, N]), all in f32, one `lax.scan` step per token."""
    def step(h, inputs):
        x, dt, b, c, keep = inputs  # [B, D], [B, D], [B, N], [B, N], [B]
        decay = jnp.exp(dt[..., None] * A_DxN) * keep[:, None, None]
        h = decay * h + (dt * x)[..., None] * b[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, c)

    time_major = [jnp.moveaxis(v.astype(jnp.float32), 1, 0) for v in (x_BxLxD, dt_BxLxD, B_BxLxN, C_BxLxN, keep_BxL)]
    last, y_LxBxD = jax.lax.scan(step, h0_BxDxN.astype(jnp.float32), tuple(time_major))
    return jnp.moveaxis(y_LxBxD, 0, 1), last


def _kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, keep_ref, h0_ref, y_ref, last_ref):
    L = x_ref.shape[1]
    A = a_ref[...]  # [Dblk, N]

    def body(t, h):
        x = x_ref[0, pl.ds(t, 1), :].reshape(-1, 1)  # [Dblk, 1]
        dt = dt_ref[0, pl.ds(t, 1), :].reshape(-1, 1)
        b = b_ref[0, pl.ds(t, 1), :]  # [1, N]
        c = c_ref[0, pl.ds(t, 1), :]
        keep = keep_ref[0, pl.ds(t, 1), :]  # [1, 1]
        h = jnp.exp(dt * A) * keep * h + (dt * x) * b
        y_ref[0, pl.ds(t, 1), :] = jnp.sum(h * c, axis=1).reshape(1, -1)
        return h

    last_ref[0] = jax.lax.fori_loop(0, L, body, h0_ref[0])


def _block_d(D, block_d):
    return block_d if D % block_d == 0 else D


@functools.partial(jax.jit, static_argnames=("block_d", "interpret"))
def _forward(x, dt, A, Bm, C, keep, h0, block_d, interpret):
    B, L, D = x.shape
    N = A.shape[1]
    bd = _block_d(D, block_d)
    f32 = jnp.float32
    per_channel = pl.BlockSpec((1, L, bd), lambda i, j: (i, 0, j))
    per_state = pl.BlockSpec((1, L, N), lambda i, j: (i, 0, 0))
    return pl.pallas_call(
        _kernel,
        out_shape=(jax.ShapeDtypeStruct((B, L, D), f32), jax.ShapeDtypeStruct((B, D, N), f32)),
        grid=(B, D // bd),
        in_specs=[
            per_channel, per_channel,
            pl.BlockSpec((bd, N), lambda i, j: (j, 0)),
            per_state, per_state,
            pl.BlockSpec((1, L, 1), lambda i, j: (i, 0, 0)),
            pl.BlockSpec((1, bd, N), lambda i, j: (i, j, 0)),
        ],
        out_specs=(per_channel, pl.BlockSpec((1, bd, N), lambda i, j: (i, j, 0))),
        interpret=interpret,
    )(
        x.astype(f32), dt.astype(f32), A.astype(f32), Bm.astype(f32), C.astype(f32),
        keep.astype(f32)[..., None], h0.astype(f32),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _scan(x, dt, A, Bm, C, keep, h0, block_d, interpret):
    return _forward(x, dt, A, Bm, C, keep, h0, block_d, interpret)


def _scan_fwd(x, dt, A, Bm, C, keep, h0, block_d, interpret):
    return _forward(x, dt, A, Bm, C, keep, h0, block_d, interpret), (x, dt, A, Bm, C, keep, h0)


def _scan_bwd(block_d, interpret, saved, cotangents):
    _, vjp = jax.vjp(selective_scan_reference, *saved)
    return vjp(cotangents)


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan_pallas(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN, keep_BxL, h0_BxDxN, block_d=128, interpret=None):
    """The kernel (same contract as `selective_scan_reference`). `interpret` defaults to True on
    CPU, where Pallas runs through its interpreter; `block_d` channels per program."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _scan(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN, keep_BxL, h0_BxDxN, block_d, interpret)
