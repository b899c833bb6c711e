"""Jitted, static-shape prefill and decode over a fixed number of lanes.

A lane is one slot of the batch holding one dialog. Lanes differ in length through positions
and masks, never through shapes, so `prefill` compiles once per chunk-length bucket and
`decode` once per (lanes, max_len, chunk). Both are pure: they take the lane state (KV cache
included, donated) and return the new one.

Per lane the state keeps `next_token` (sampled and already reported, not yet in the cache) and
`position` (the cache slot it will be written to). The sample for a lane's n-th generated token
uses the key `fold_in(request_key, n)`, so a request's tokens depend on its own seed only: not
on the lane it ran in, the other lanes, or how decoding was chunked.
"""
import collections
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.generate.cache import cache_spec, init_cache, is_leaf
from lmjax.generate.sampling import SamplingParams, sample


@flax.struct.dataclass
class LaneState:
    cache: Any  # the model family's cache pytree (lmjax.generate.cache), e.g. a KVCache
    next_token: jax.Array  # [B] int32
    position: jax.Array  # [B] int32
    generated: jax.Array  # [B] int32: tokens sampled for the lane's current request
    active: jax.Array  # [B] bool: the lane keeps decoding


@flax.struct.dataclass
class LaneRequests:
    """What the host asks of each lane, [B] arrays passed to every call (cheap, never traced anew)."""

    keys: jax.Array  # [B, 2] uint32 raw PRNG keys, one per request
    max_new: jax.Array  # [B] int32
    sampling: SamplingParams

    @classmethod
    def empty(cls, lanes):
        return cls(np.zeros((lanes, 2), np.uint32), np.zeros((lanes,), np.int32), SamplingParams.for_lanes(lanes))


def request_key(seed: int):
    """The raw threefry key of `jax.random.key(seed)` (which keeps the low 32 bits of the seed
    unless jax_enable_x64 is on), built in numpy: no device op per request."""
    return np.asarray([0, int(seed) & 0xFFFFFFFF], dtype=np.uint32)


MIN_EXTENT = 128  # the smallest cache extent decode attends over (smaller ones save little and compile more)


class Decoder:
    """prefill/decode for `model` with `lanes` lanes of `max_len` cache slots each."""

    def __init__(self, model, lanes: int, max_len: int, *, stop_ids=(), chunk: int = 16, min_bucket: int = 16, cache_dtype=None,
                 sample_vocab=None, layout=None, attend_filled: bool = True):
        """`sample_vocab`: sample only ids below it (a tokenizer smaller than the model's vocabulary).
        `layout` (lmjax.parallel.layout): run on its mesh, the cache split by lanes over `data`
        and by kv heads over `model`; the parameters must be laid out on the same mesh.
        `attend_filled`: decode attends over the filled part of a transformer's cache (False: over
        every slot, as before; for comparisons)."""
        if lanes <= 0 or max_len <= 0 or chunk <= 0:
            raise ValueError(f"lanes, max_len and chunk must be positive, got {lanes}, {max_len}, {chunk}.")
        self.model, self.lanes, self.max_len, self.chunk = model, lanes, max_len, chunk
        self.vocab_size = model.cfg.vocab_size
        self.sample_vocab = min(sample_vocab or self.vocab_size, self.vocab_size)
        self.stop_ids = np.asarray(sorted(set(stop_ids)) or [-1], np.int32)
        self.buckets = [min_bucket * 2**i for i in range(32) if min_bucket * 2**i < max_len] + [max_len]
        # Decode attends over the filled part of a KV cache only, rounded up to one of these
        # extents (one compile each): a step reads the slots lanes have reached, not all of them.
        filled = attend_filled and getattr(model, "ATTEND_SLOTS", False)
        self.extents = sorted({min(max_len, max(MIN_EXTENT, b)) for b in self.buckets}) if filled else [max_len]
        self.cache_dtype = cache_dtype
        self.compilations = collections.Counter()  # ("prefill", bucket) / ("decode", chunk) -> traces
        self.layout = layout
        if layout is None:
            self._init = jax.jit(self._init_impl)
            self._prefill = jax.jit(self._prefill_impl, donate_argnums=(1,))
            self._decode = jax.jit(self._decode_impl, donate_argnums=(1,), static_argnums=(3,))
        else:
            layout.check_rows(lanes, "lanes")
            shardings = self._state_shardings(layout)
            self._init = layout.jit(self._init_impl, out_shardings=shardings)
            self._prefill = layout.jit(self._prefill_impl, donate_argnums=(1,), out_shardings=shardings)
            rep = layout.replicated
            self._decode = layout.jit(self._decode_impl, donate_argnums=(1,), static_argnums=(3,), out_shardings=(shardings, rep, rep))

    def _state_shardings(self, layout) -> LaneState:
        """The cache by its logical axes; the per-lane counters replicated (the host reads them)."""
        spec = cache_spec(self.model, self.lanes, self.max_len, self.cache_dtype)
        cache = jax.tree_util.tree_map(lambda leaf: layout.sharding(leaf.shape, leaf.axes), spec, is_leaf=is_leaf)
        rep = layout.replicated
        return LaneState(cache=cache, next_token=rep, position=rep, generated=rep, active=rep)

    def init_state(self) -> LaneState:
        return self._init()

    def _init_impl(self) -> LaneState:
        B = self.lanes
        return LaneState(
            cache=init_cache(self.model, B, self.max_len, self.cache_dtype),
            next_token=jnp.zeros((B,), jnp.int32),
            position=jnp.zeros((B,), jnp.int32),
            generated=jnp.zeros((B,), jnp.int32),
            active=jnp.zeros((B,), bool),
        )

    def bucket(self, n: int) -> int:
        """The chunk length a prefill of n tokens is padded to."""
        for size in self.buckets:
            if n <= size:
                return size
        raise ValueError(f"{n} tokens do not fit the cache of {self.max_len} slots.")

    def warm_up(self, params):
        """Compile prefill for every bucket and decode, so that no later call compiles."""
        state, requests = self.init_state(), LaneRequests.empty(self.lanes)
        for size in self.buckets:
            chunks = [[0] * size] + [[] for _ in range(self.lanes - 1)]
            state, _ = self.prefill(params, state, chunks, np.zeros(self.lanes, np.int32), requests)
        for extent in self.extents:
            state = self._decode(params, state, requests, extent)[0]

    # -- host-facing calls ---------------------------------------------------------------------

    def prefill(self, params, state, chunks, starts, requests, *, prompt=None, reset=None):
        """Write `chunks[b]` (a list of token ids, possibly empty) into lane b at `starts[b]`.

        Lanes with an empty chunk are untouched. Each written lane then samples its next token
        from the logits after its chunk. `prompt[b]`: the chunk is a prompt (bidirectional under
        a prefix-LM model). `reset[b]`: a new request starts in lane b (its count restarts).
        Returns (state, next_token [B] as numpy).
        """
        B = self.lanes
        lengths = np.asarray([len(c) for c in chunks], np.int32)
        T = self.bucket(max(int(lengths.max()), 1))
        tokens = np.zeros((B, T), np.int32)
        for b, chunk in enumerate(chunks):
            tokens[b, : len(chunk)] = chunk
        prompt = np.zeros(B, bool) if prompt is None else np.asarray(prompt, bool)
        reset = np.zeros(B, bool) if reset is None else np.asarray(reset, bool)
        state = self._prefill(params, state, tokens, np.asarray(starts, np.int32), lengths, prompt, reset, requests)
        return state, np.asarray(state.next_token)

    def decode(self, params, state, requests):
        """Up to `chunk` decode steps for every active lane, stopping early once none is active.

        Returns (state, tokens [B, chunk], counts [B]): lane b produced tokens[b, :counts[b]].
        """
        state, out, counts = self._decode(params, state, requests, self.extent(state))
        return state, np.asarray(out), np.asarray(counts)

    def extent(self, state) -> int:
        """The cache slots this decode call attends over: every slot an active lane can reach in
        `chunk` steps (its position + chunk), rounded up to an extent."""
        position, active = np.asarray(state.position), np.asarray(state.active)
        reach = int(position[active].max()) + self.chunk if active.any() else 0
        return next((e for e in self.extents if e >= reach), self.extents[-1])

    # -- traced ---------------------------------------------------------------------------------

    def _sample_and_advance(self, logits_BxV, state, requests, written_B, new_position_B, reset_B):
        if self.sample_vocab < self.vocab_size:
            logits_BxV = jnp.where(jnp.arange(self.vocab_size) < self.sample_vocab, logits_BxV, -jnp.inf)
        generated = jnp.where(reset_B, 0, state.generated)
        keys = jax.vmap(jax.random.fold_in)(requests.keys, generated)
        token = sample(logits_BxV, keys, requests.sampling)
        generated = generated + 1
        stop = jnp.isin(token, self.stop_ids) | (generated >= requests.max_new) | (new_position_B >= self.max_len)
        return state.replace(
            next_token=jnp.where(written_B, token, state.next_token),
            position=jnp.where(written_B, new_position_B, state.position),
            generated=jnp.where(written_B, generated, state.generated),
            active=jnp.where(written_B, ~stop, state.active),
        )

    def _prefill_impl(self, params, state, tokens_BxT, start_B, length_B, prompt_B, reset_B, requests):
        T = tokens_BxT.shape[1]
        self.compilations[("prefill", T)] += 1
        offsets = jnp.arange(T)[None, :]
        valid_BxT = offsets < length_B[:, None]
        logits_BxV, cache = self.model.apply(
            {"params": params}, tokens_BxT, start_B[:, None] + offsets, valid_BxT.astype(jnp.int32),
            prompt_B[:, None] & valid_BxT, cache=state.cache, logits_at_B=jnp.maximum(length_B - 1, 0),
        )
        state = state.replace(cache=cache)
        return self._sample_and_advance(logits_BxV, state, requests, length_B > 0, start_B + length_B, reset_B)

    def _decode_impl(self, params, state, requests, extent):
        B, K = self.lanes, self.chunk
        self.compilations[("decode", (K, extent))] += 1
        slots = {"attend_slots": extent} if extent < self.max_len else {}

        def step(carry):
            i, state, out, counts = carry
            writing = state.active
            logits_BxV, cache = self.model.apply(
                {"params": params}, state.next_token[:, None], state.position[:, None],
                writing[:, None].astype(jnp.int32), cache=state.cache, logits_at_B=jnp.zeros((B,), jnp.int32), **slots,
            )
            state = self._sample_and_advance(
                logits_BxV, state.replace(cache=cache), requests, writing, state.position + 1, jnp.zeros((B,), bool)
            )
            out = out.at[jnp.arange(B), counts].set(jnp.where(writing, state.next_token, 0), mode="drop")
            return i + 1, state, out, counts + writing

        def keep_going(carry):
            i, state, _, _ = carry
            return (i < K) & jnp.any(state.active)

        init = (0, state, jnp.zeros((B, K), jnp.int32), jnp.zeros((B,), jnp.int32))
        _, state, out, counts = jax.lax.while_loop(keep_going, step, init)
        return state, out, counts
