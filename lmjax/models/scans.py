"""Linear recurrences for the recurrent families (Mamba, RNNs), shared helpers for packed rows.

Every recurrent layer here is `h_t = a_t * h_{t-1} + b_t` (elementwise), started from a given
state `h0`. Packed sequences reset the state where a new segment starts: `a_t = 0` there, so
`h_t = b_t` forgets the previous segment. Three interchangeable evaluations:

- `sequential`: `lax.scan` over time, the reference (O(L) steps, O(1) memory in L);
- `associative`: `lax.associative_scan` over the whole length (O(log L) depth);
- `chunked`: `associative_scan` within chunks of `chunk_size`, a `lax.scan` carrying the state
  from chunk to chunk (O(L/T + log T) depth, memory of one chunk at a time).
"""
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models.transformer import REMAT_POLICIES

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


# --- The shell shared by the recurrent language models (Mamba, RNNs) -----------------------------
# Called from inside a model's compact `__call__`, so the submodules they create belong to it.


def run_layers(block_cls, cfg, x_BxLxE, reset_BxL, state, hold_BxL=None):
    """Apply `cfg.n_layers` blocks `block_cls(cfg)(x, reset, layer_state, hold) -> (x, layer_state)`.

    `state`: a pytree of per-layer states stacked on a leading layers axis, or None (training:
    each layer starts from zeros and no state is returned). `hold_BxL`: tokens that leave the
    state as it is (generation). Returns (x, new stacked state)."""
    block = block_cls
    if REMAT_POLICIES[cfg.remat] is not None or cfg.remat == "full":
        block = nn.remat(block_cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    if not cfg.scan_layers:
        new_states = []
        for i in range(cfg.n_layers):
            layer_state = None if state is None else jax.tree_util.tree_map(lambda s: s[i], state)
            x_BxLxE, layer_state = block(cfg, name=f"layer_{i}")(x_BxLxE, reset_BxL, layer_state, hold_BxL)
            new_states.append(layer_state)
        if state is None:
            return x_BxLxE, None
        return x_BxLxE, jax.tree_util.tree_map(lambda *s: jnp.stack(s), *new_states)
    layers = nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, 0, nn.broadcast),
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, name="layers")
    return layers(x_BxLxE, reset_BxL, state, hold_BxL)


def fresh_rows(state, positions_BxL, hold_BxL):
    """Zero the state of rows whose chunk starts a new sequence (first token written at
    position 0): a lane taking a new request forgets the previous one. State leaves are
    [layers, B, ...]."""
    fresh_B = (positions_BxL[:, 0] == 0) & ~hold_BxL[:, 0]
    return jax.tree_util.tree_map(
        lambda s: jnp.where(fresh_B.reshape((1, -1) + (1,) * (s.ndim - 2)), jnp.zeros_like(s), s), state
    )


def lm_head(cfg, embed, x_BxLxE, logits_at_B, init_for):
    """Final RMSNorm and output head (tied or not); logits in f32, [B, L, V] or [B, V] at
    `logits_at_B`."""
    from lmjax.models.layers import Projection, RMSNorm

    dt, pdt = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    B = x_BxLxE.shape[0]
    if logits_at_B is not None:
        x_BxLxE = x_BxLxE[jnp.arange(B), logits_at_B][:, None, :]
    x_BxLxE = RMSNorm(cfg.norm_eps, pdt, dt, name="final_norm")(x_BxLxE)
    if cfg.tie_embeddings:
        logits = embed.attend(x_BxLxE)
    else:
        head_init = init_for(cfg.init, cfg.dim, cfg.n_layers, "in")
        logits = Projection((cfg.dim,), (cfg.vocab_size,), ("embed", "vocab"), head_init, pdt, dt, name="lm_head")(x_BxLxE)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits[:, 0] if logits_at_B is not None else logits


def recurrent_lm(cfg, block_cls, state_cls, tokens_BxL, positions_BxL, segment_ids_BxL, cache, logits_at_B, state):
    """The language model around a family's recurrent blocks (called from its compact `__call__`):
    embedding, the layers, final norm and head. Training: `segment_ids` reset the state at packed
    boundaries. `state`: continue from it, return (logits, new state). `cache` (the decoder's
    interface): rows are chunks of one sequence each; tokens with segment id 0 (at the end of a
    row) are not written, and a chunk written at position 0 starts from a zero state."""
    from lmjax.models.layers import Embedding, init_for

    dt, pdt = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    B, L = tokens_BxL.shape
    hold_BxL = None
    reset_BxL = jnp.zeros((B, L), bool)
    if cache is not None:
        hold_BxL = segment_ids_BxL == 0
        state = fresh_rows(state_cls(*cache), positions_BxL, hold_BxL)
    elif segment_ids_BxL is not None:
        reset_BxL = segment_resets(segment_ids_BxL)
    embed = Embedding(cfg.vocab_size, cfg.dim, init_for(cfg.init, cfg.dim, cfg.n_layers, "embed"), pdt, dt, name="embed")
    x = nn.with_logical_constraint(embed(tokens_BxL), ("batch", "length", "embed"))
    layer_state = None if state is None else state_cls(*state)
    x, new_state = run_layers(block_cls, cfg, x, reset_BxL, layer_state, hold_BxL)
    logits = lm_head(cfg, embed, x, logits_at_B, init_for)
    return logits if state is None else (logits, state_cls(*new_state))


class StateLeaf(NamedTuple):
    """One array of a recurrent state (or a generation cache): shape, dtype, logical axes."""

    shape: tuple
    dtype: Any
    axes: tuple


def zeros_of(spec):
    return jax.tree_util.tree_map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), spec,
                                  is_leaf=lambda x: isinstance(x, StateLeaf))


class RecurrentLM(nn.Module):
    """A recurrent language model: a family sets `cfg`, its `block` class, its `state_type`
    (a NamedTuple stacked over layers) and `state_spec(cfg, batch, dtype=None)`."""

    block: ClassVar[type]
    state_type: ClassVar[type]
    state_spec: ClassVar[Any]

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, prompt_BxL=None, cache=None,
                 logits_at_B=None, state=None, max_segment_len: int = 0):
        """Logits [B, L, V] in f32, the signature of `Transformer`. `segment_ids_BxL`: packed
        sequences (the recurrence restarts where the id changes); positions and prompt are not
        used (order is the recurrence's own). `state`: continue from it and return (logits, new
        state) — prefill from `init_state`, or a chunk of decoding. `cache` (the decoder's
        interface, see lmjax.generate.cache): each row is a chunk of one sequence; tokens with
        segment id 0 (always at the end of a row) are not written, and a row whose chunk starts
        at position 0 starts from a zero state. `max_segment_len` is accepted for the shared
        signature and unused: a recurrence has no attention blocks to skip."""
        return recurrent_lm(self.cfg, self.block, self.state_type, tokens_BxL, positions_BxL, segment_ids_BxL, cache,
                            logits_at_B, state)

    def init_state(self, batch: int):
        return zeros_of(type(self).state_spec(self.cfg, batch))

    def step(self, tokens_B, state):
        """One token per row: (logits [B, V], the next state)."""
        logits, state = self(tokens_B[:, None], state=state)
        return logits[:, 0], state
