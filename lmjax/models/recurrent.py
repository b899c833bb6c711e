"""The language model around the recurrent families' blocks (Mamba, RNNs): embedding, layers that
carry a state, final norm and head, and generation from that state.

A family subclasses `RecurrentLM`: it sets `cfg`, its `block` class
(`block(cfg)(x, reset, layer_state, hold) -> (x, layer_state)`), its `state_type` (a NamedTuple
of per-layer states stacked on a leading layers axis) and defines
`cache_spec(lanes, max_len=0, dtype=None)`, the state as CacheLeafs.
"""
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models.cache_spec import zeros_of
from lmjax.models.layers import Embedding, init_for, lm_head, remat_block, scanned_layers
from lmjax.models.scans import segment_resets


def run_layers(block_cls, cfg, x_BxLxE, reset_BxL, state, hold_BxL=None):
    """Apply `cfg.n_layers` blocks `block_cls(cfg)(x, reset, layer_state, hold) -> (x, layer_state)`
    (call it from a compact `__call__`: the blocks belong to that module).

    `state`: a pytree of per-layer states stacked on a leading layers axis, or None (training:
    each layer starts from zeros and no state is returned). `hold_BxL`: tokens that leave the
    state as it is (generation). Returns (x, new stacked state)."""
    block = remat_block(block_cls, cfg.remat)
    if not cfg.scan_layers:
        new_states = []
        for i in range(cfg.n_layers):
            layer_state = None if state is None else jax.tree_util.tree_map(lambda s: s[i], state)
            x_BxLxE, layer_state = block(cfg, name=f"layer_{i}")(x_BxLxE, reset_BxL, layer_state, hold_BxL)
            new_states.append(layer_state)
        if state is None:
            return x_BxLxE, None
        return x_BxLxE, jax.tree_util.tree_map(lambda *s: jnp.stack(s), *new_states)
    layers = scanned_layers(block, cfg, in_axes=(nn.broadcast, 0, nn.broadcast))
    return layers(x_BxLxE, reset_BxL, state, hold_BxL)


def fresh_rows(state, positions_BxL, hold_BxL):
    """Zero the state of rows whose chunk starts a new sequence (first token written at
    position 0): a lane taking a new request forgets the previous one. State leaves are
    [layers, B, ...]."""
    fresh_B = (positions_BxL[:, 0] == 0) & ~hold_BxL[:, 0]
    return jax.tree_util.tree_map(
        lambda s: jnp.where(fresh_B.reshape((1, -1) + (1,) * (s.ndim - 2)), jnp.zeros_like(s), s), state
    )


class RecurrentLM(nn.Module):
    """A recurrent language model; see the module doc for what a family sets."""

    block: ClassVar[type]
    state_type: ClassVar[type]

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
        cfg, state_cls = self.cfg, self.state_type
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
        x, new_state = run_layers(self.block, cfg, x, reset_BxL, layer_state, hold_BxL)
        logits = lm_head(cfg, embed, x, logits_at_B)
        return logits if state is None else (logits, state_cls(*new_state))

    def init_state(self, batch: int):
        """Zeros: the state before any token, for `batch` rows."""
        return zeros_of(self.cache_spec(batch))

    def step(self, tokens_B, state):
        """One token per row: (logits [B, V], the next state)."""
        logits, state = self(tokens_B[:, None], state=state)
        return logits[:, 0], state
