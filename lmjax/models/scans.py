"""Linear recurrences for the recurrent families (Mamba, RNNs), and the helpers they need for
packed rows (segment resets, a causal conv that does not reach across them).

Every recurrent layer here is `h_t = a_t * h_{t-1} + b_t` (elementwise), started from a given
state `h0`. Packed sequences reset the state where a new segment starts: `a_t = 0` there, so
`h_t = b_t` forgets the previous segment. Three interchangeable evaluations:

- `sequential`: `lax.scan` over time, the reference (O(L) steps, O(1) memory in L);
- `associative`: `lax.associative_scan` over the whole length (O(log L) depth);
- `chunked`: `associative_scan` within chunks of `chunk_size`, a `lax.scan` carrying the state
  from chunk to chunk (O(L/T + log T) depth, memory of one chunk at a time).
"""
import jax
import jax.numpy as jnp

LINEAR_SCANS = ("sequential", "associative", "chunked")


def segment_resets(segment_ids_BxL):
    """True where a token starts a new segment (its segment id differs from the previous token's).

    The first column is False: a row continues whatever state it is started from (zeros in
    training, where that is the same as a reset)."""
    changed = segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def tokens_since_reset(reset_BxL):
    """[B, L] int32: how many tokens back the current segment started (a large number where it
    started before this chunk, i.e. in the state)."""
    L = reset_BxL.shape[1]
    t = jnp.arange(L, dtype=jnp.int32)
    last_reset = jax.lax.cummax(jnp.where(reset_BxL, t, -(2**30)), axis=1)
    return t - last_reset


def causal_conv(x_BxLxD, kernel_KxD, bias_D, reset_BxL, window_BxKm1xD, hold_BxL=None):
    """Depthwise causal conv1d of width K over time, continuing from `window` (the K-1 inputs
    before this chunk; zeros at the start of a sequence). Inputs from before a segment reset
    do not reach tokens after it. Returns (y [B, L, D], the new window [B, K-1, D]).

    `hold_BxL` (generation): tokens that are not written, always at the end of a row; the new
    window ends at the row's last written token."""
    K = kernel_KxD.shape[0]
    L = x_BxLxD.shape[1]
    padded = jnp.concatenate([window_BxKm1xD.astype(x_BxLxD.dtype), x_BxLxD], axis=1)  # [B, K-1+L, D]
    since = tokens_since_reset(reset_BxL)[..., None]
    y = jnp.zeros_like(x_BxLxD) + bias_D.astype(x_BxLxD.dtype)
    for k in range(K):  # tap k reads the input k steps back
        shifted = padded[:, K - 1 - k : K - 1 - k + L]
        y = y + jnp.where(since >= k, shifted, 0) * kernel_KxD[K - 1 - k].astype(x_BxLxD.dtype)
    if hold_BxL is None:
        return y, padded[:, L:]
    written_B = jnp.sum(~hold_BxL, axis=1)
    return y, jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, K - 1, axis=0))(padded, written_B)


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _broadcast_like(mask_BxL, x):
    return mask_BxL.reshape(mask_BxL.shape + (1,) * (x.ndim - 2))


def linear_scan(a_BxLx, b_BxLx, h0_Bx, reset_BxL=None, method="associative", chunk_size=64, hold_BxL=None):
    """All states of `h_t = a_t * h_{t-1} + b_t` from `h0` (a, b: [B, L, ...]; h0: [B, ...]), with
    `a_t = 0` where `reset_BxL`, and the state left as it is (a = 1, b = 0) where `hold_BxL`
    (generation: tokens not written). Returns (h [B, L, ...], the last state [B, ...])."""
    if reset_BxL is not None:
        a_BxLx = jnp.where(_broadcast_like(reset_BxL, a_BxLx), 0, a_BxLx)
    if hold_BxL is not None:
        a_BxLx = jnp.where(_broadcast_like(hold_BxL, a_BxLx), 1, a_BxLx)
        b_BxLx = jnp.where(_broadcast_like(hold_BxL, b_BxLx), 0, b_BxLx)
    if method == "sequential":
        def step(h, ab):
            h = ab[0] * h + ab[1]
            return h, h

        last, h_LxBx = jax.lax.scan(step, h0_Bx, (jnp.moveaxis(a_BxLx, 1, 0), jnp.moveaxis(b_BxLx, 1, 0)))
        return jnp.moveaxis(h_LxBx, 0, 1), last
    if method == "associative":
        a_cum, b_cum = jax.lax.associative_scan(_combine, (a_BxLx, b_BxLx), axis=1)
        h = a_cum * h0_Bx[:, None] + b_cum
        return h, h[:, -1]
    if method == "chunked":
        B, L = a_BxLx.shape[:2]
        T = min(chunk_size, L)
        pad = -L % T  # trailing steps with a = 1, b = 0 leave the state as it is

        def chunks(x, fill):  # [B, L, ...] -> [(L+pad)/T, B, T, ...]
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
            return jnp.moveaxis(x.reshape((B, (L + pad) // T, T) + x.shape[2:]), 1, 0)

        def one_chunk(h, ab):
            a_cum, b_cum = jax.lax.associative_scan(_combine, ab, axis=1)
            hs = a_cum * h[:, None] + b_cum
            return hs[:, -1], hs

        last, h_CxBxTx = jax.lax.scan(one_chunk, h0_Bx, (chunks(a_BxLx, 1), chunks(b_BxLx, 0)))
        h = jnp.moveaxis(h_CxBxTx, 0, 1).reshape((B, L + pad) + a_BxLx.shape[2:])
        return h[:, :L], last
    raise ValueError(f"Unknown scan {method!r}; choose one of: {', '.join(LINEAR_SCANS)}.")


SSM_SCANS = ("sequential", "chunked", "pallas")


def selective_scan(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN, reset_BxL, h0_BxDxN, method="chunked", chunk_size=64):
    """Mamba's selective SSM: `h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t` per channel (state [D, N]),
    `y_t = h_t . C_t`, the state reset where `reset_BxL`. Returns (y [B, L, D], last state
    [B, D, N]) in f32. `method`: 'sequential' (lax.scan reference), 'chunked' (associative
    scans within chunks of `chunk_size`, materialising [B, chunk, D, N] at a time) or 'pallas'
    (lmjax.kernels.ssm_scan)."""
    from lmjax.kernels.ssm_scan import selective_scan_pallas, selective_scan_reference

    keep_BxL = 1.0 - reset_BxL.astype(jnp.float32)
    args = (x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN, keep_BxL, h0_BxDxN)
    if method == "sequential":
        return selective_scan_reference(*args)
    if method == "pallas":
        return selective_scan_pallas(*args)
    if method != "chunked":
        raise ValueError(f"Unknown scan {method!r}; choose one of: {', '.join(SSM_SCANS)}.")
    B, L, D = x_BxLxD.shape
    T = min(chunk_size, L)
    pad = -L % T  # trailing steps with dt = 0 and keep = 1 leave the state as it is
    A = A_DxN.astype(jnp.float32)

    def chunks(v):  # [B, L, ...] -> [(L+pad)/T, B, T, ...]
        v = jnp.pad(v.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        return jnp.moveaxis(v.reshape((B, (L + pad) // T, T) + v.shape[2:]), 1, 0)

    def one_chunk(h, inputs):
        x, dt, b, c, reset = inputs
        a_BxTxDxN = jnp.where(reset[..., None, None] > 0, 0.0, jnp.exp(dt[..., None] * A))
        b_BxTxDxN = (dt * x)[..., None] * b[:, :, None, :]
        a_cum, b_cum = jax.lax.associative_scan(_combine, (a_BxTxDxN, b_BxTxDxN), axis=1)
        hs = a_cum * h[:, None] + b_cum
        return hs[:, -1], jnp.einsum("btdn,btn->btd", hs, c)

    inputs = tuple(chunks(v) for v in (x_BxLxD, dt_BxLxD, B_BxLxN, C_BxLxN, reset_BxL))
    last, y_CxBxTxD = jax.lax.scan(one_chunk, h0_BxDxN.astype(jnp.float32), inputs)
    return jnp.moveaxis(y_CxBxTxD, 0, 1).reshape(B, L + pad, D)[:, :L], last
