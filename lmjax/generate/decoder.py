"""Jitted, static-shape prefill and decode over a fixed number of lanes.

A lane is one slot of the batch holding one dialog. Lanes differ in length through positions
and masks, never through shapes, so `prefill` compiles once per chunk-length bucket and
`decode` once per (lanes, max_len, chunk). Both are pure: they take the lane state (KV cache
included, donated) and return the new one.

Per lane the state keeps `next_token` (sampled and already reported, not yet in the cache) and
`position` (the cache slot it will be written to). The sample for a lane's n-th generated token
uses the key `fold_in(request_key, n)`, so a request's tokens depend on its own seed only: not
on the lane it ran in, the other lanes, or how decoding was chunked.

A transformer's cache may be paged (`page_size` > 0): the decoder then keeps the host side of
it (`self.pages`, lmjax.generate.pages) for the state of its latest `init_state`, gives lanes
pages before each call writes, shares the pages of common prompt prefixes between lanes, and
can page a waiting lane out to host memory (`page_out` / `page_in`). Calls and results are the
same as with the contiguous cache.
"""
import collections
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.generate.cache import cache_spec, is_leaf
from lmjax.generate.pages import PagePool
from lmjax.models.cache_spec import zeros_of
from lmjax.generate.sampling import SamplingParams, sample
from lmjax.xla_flags import decoding_compiler_options


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
                 sample_vocab=None, layout=None, attend_filled: bool = True, page_size: int = 0, n_pages: int = 0):
        """`sample_vocab`: sample only ids below it (a tokenizer smaller than the model's vocabulary).
        `layout` (lmjax.parallel.layout): run on its mesh, the cache split by lanes over `data`
        and by kv heads over `model`; the parameters must be laid out on the same mesh.
        `attend_filled`: decode attends over the filled part of a transformer's cache (False: over
        every slot, as before; for comparisons).
        `page_size` > 0 (transformers): a paged cache of `n_pages` pages of `page_size` slots
        (default: as many slots as the contiguous cache, lanes * max_len), `max_len` a multiple
        of `page_size`; common prompt prefixes share pages (not for prefix-LM models)."""
        if lanes <= 0 or max_len <= 0 or chunk <= 0:
            raise ValueError(f"lanes, max_len and chunk must be positive, got {lanes}, {max_len}, {chunk}.")
        self.page_size = page_size
        if page_size:
            if not getattr(model, "PAGED_CACHE", False):
                raise ValueError(f"A paged cache needs a transformer; {type(model).__name__} keeps a recurrent state.")
            if page_size < 0 or max_len % page_size:
                raise ValueError(f"max_len={max_len} must be a multiple of page_size={page_size} (> 0).")
            self.n_pages = n_pages or lanes * max_len // page_size
            self.share_prefixes = not getattr(model.cfg, "prefix_lm", False)
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
        self.compilations = collections.Counter()  # ("prefill", (rows, bucket)) / ("decode", (chunk, extent)) -> traces
        # Rows of a prefill call: every lane, or (paged cache, one device) the lanes with a chunk
        # padded to a power of 4: a new dialog in one lane is prefilled in one row.
        subsets = page_size and layout is None
        self.row_counts = sorted({4**i for i in range(16) if 4**i < lanes} | {lanes}) if subsets else [lanes]
        self.layout = layout
        fast = {"compiler_options": decoding_compiler_options()}  # lmjax.xla_flags: YNNPACK's dots on CPU
        if layout is None:
            self._init = jax.jit(self._init_impl)
            self._prefill = jax.jit(self._prefill_impl, donate_argnums=(1,), **fast)
            self._decode = jax.jit(self._decode_impl, donate_argnums=(1,), static_argnums=(3,), **fast)
        else:
            layout.check_rows(lanes, "lanes")
            shardings = self._state_shardings(layout)
            self._init = layout.jit(self._init_impl, out_shardings=shardings)
            self._prefill = layout.jit(self._prefill_impl, donate_argnums=(1,), out_shardings=shardings, **fast)
            rep = layout.replicated
            self._decode = layout.jit(self._decode_impl, donate_argnums=(1,), static_argnums=(3,), out_shardings=(shardings, rep, rep),
                                      **fast)
        if page_size:
            jit = jax.jit if layout is None else layout.jit
            out = {} if layout is None else {"out_shardings": shardings}
            self._read_pages = jit(self._read_pages_impl)
            self._write_pages = jit(self._write_pages_impl, donate_argnums=(0,), **out)
            self._copy_pages = jit(self._copy_pages_impl, donate_argnums=(0,), **out)

    def _state_shardings(self, layout) -> LaneState:
        """The cache by its logical axes; the per-lane counters replicated (the host reads them)."""
        spec = self._cache_spec()
        cache = jax.tree_util.tree_map(lambda leaf: layout.sharding(leaf.shape, leaf.axes), spec, is_leaf=is_leaf)
        rep = layout.replicated
        return LaneState(cache=cache, next_token=rep, position=rep, generated=rep, active=rep)

    def _cache_spec(self):
        if not self.page_size:
            return cache_spec(self.model, self.lanes, self.max_len, self.cache_dtype)
        return self.model.cache_spec(self.lanes, self.max_len, self.cache_dtype, page_size=self.page_size, n_pages=self.n_pages)

    def init_state(self) -> LaneState:
        """Empty lanes (for a paged cache: every page free, nothing shared)."""
        if self.page_size:
            self.pages = PagePool(self.n_pages, self.page_size, self.lanes, self.max_len // self.page_size, self.share_prefixes)
            self.pages.changed = False  # the device's table is all "no page" too
        return self._init()

    def _init_impl(self) -> LaneState:
        B = self.lanes
        cache = zeros_of(self._cache_spec())
        if self.page_size:
            cache = cache._replace(page_table=jnp.full_like(cache.page_table, self.n_pages))
        return LaneState(
            cache=cache,
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
        for rows in self.row_counts:  # chunks of no tokens: the programs, without writing a slot
            idle = np.zeros(rows, np.int32)
            for size in self.buckets:
                state = self._prefill(params, state, np.arange(rows, dtype=np.int32), np.zeros((rows, size), np.int32),
                                      idle, idle, idle.astype(bool), idle.astype(bool), requests)
        for extent in self.extents:
            state = self._decode(params, state, requests, extent)[0]
        if self.page_size:
            none = self._padded([])
            state = self._copy_pages(state, none, none)
            k, v = self._read_pages(state.cache, none)
            self._write_pages(state, none, k, v)

    # -- host-facing calls ---------------------------------------------------------------------

    def prefill(self, params, state, chunks, starts, requests, *, prompt=None, reset=None):
        """Write `chunks[b]` (a list of token ids, possibly empty) into lane b at `starts[b]`.

        Lanes with an empty chunk are untouched. Each written lane then samples its next token
        from the logits after its chunk. `prompt[b]`: the chunk is a prompt (bidirectional under
        a prefix-LM model). `reset[b]`: a new request starts in lane b (its count restarts).
        Returns (state, next_token [B] as numpy).
        """
        B = self.lanes
        chunks, starts = [list(c) for c in chunks], np.array(starts, np.int32)
        prompt = np.zeros(B, bool) if prompt is None else np.asarray(prompt, bool)
        reset = np.zeros(B, bool) if reset is None else np.asarray(reset, bool)
        later = set()
        if self.page_size:
            state, later = self._pages_for_prefill(state, chunks, starts, reset)
        # Lanes that share pages other lanes fill now go second, in a call padded to their own
        # (shorter) chunks: one long system prompt is then computed once, not once per lane.
        for group in ([c if b not in later else [] for b, c in enumerate(chunks)],
                      [c if b in later else [] for b, c in enumerate(chunks)]):
            if any(group):
                state = self._prefill_call(params, state, group, starts, prompt, reset, requests)
        return state, np.asarray(state.next_token)

    def _prefill_call(self, params, state, chunks, starts, prompt, reset, requests):
        """One jitted prefill over the lanes with a chunk, padded with idle lanes to one of
        `row_counts` rows (a paged cache gives any subset of lanes its own page table: a refill
        of one lane costs one row, not `lanes`)."""
        busy = [b for b, chunk in enumerate(chunks) if chunk]
        R = next(r for r in self.row_counts if r >= len(busy))
        rows = np.arange(self.lanes) if R == self.lanes else np.asarray(
            busy + [b for b in range(self.lanes) if not chunks[b]][: R - len(busy)], np.int32)
        lengths = np.asarray([len(chunks[b]) for b in rows], np.int32)
        tokens = np.zeros((R, self.bucket(max(int(lengths.max()), 1))), np.int32)
        for i, b in enumerate(rows):
            tokens[i, : len(chunks[b])] = chunks[b]
        return self._prefill(params, state, rows, tokens, starts[rows], lengths, prompt[rows], reset[rows], requests)

    def decode(self, params, state, requests):
        """Up to `chunk` decode steps for every active lane, stopping early once none is active.

        Returns (state, tokens [B, chunk], counts [B]): lane b produced tokens[b, :counts[b]].
        """
        if self.page_size:
            before = (np.asarray(state.position), np.asarray(state.next_token))
            state = self._pages_for_decode(state, before[0])
        state, out, counts = self._decode(params, state, requests, self.extent(state))
        out, counts = np.asarray(out), np.asarray(counts)
        if self.page_size:
            for b in np.flatnonzero(counts):  # a step writes the token sampled by the step before
                self.pages.wrote(b, int(before[0][b]), [before[1][b], *out[b, : counts[b] - 1]])
        return state, out, counts

    # -- paged cache ----------------------------------------------------------------------------

    def release_lane(self, b: int) -> None:
        """Lane b's dialog is over: its pages go back to the pool (shared prefixes stay cached)."""
        if self.page_size:
            self.pages.release(b)

    def page_out(self, state, b: int):
        """Free lane b's pages while it waits (e.g. on a tool call): its full pages stay in the
        prefix cache (spilled to host memory if the pool needs them), its partly filled last page
        is copied to the host. Returns what `page_in` needs."""
        self._reads_from(state)
        return self.pages.page_out(b)

    def page_in(self, state, b: int, saved):
        """Lane b holds its pages again, as before `page_out`; returns the state. Raises
        CacheFull when too few pages are free (nothing changes then)."""
        self._reads_from(state)
        self.pages.page_in(b, *saved)
        return self._sync_pages(state)

    def _reads_from(self, state):
        """Pages the pool spills or pages out are read from this state (before the next call)."""
        self.pages.read_page = lambda page: self._read_page(state, page)

    def _pages_for_prefill(self, state, chunks, starts, reset):
        """Pages for every slot the chunks write; a new dialog (reset at slot 0) first takes the
        shared pages of its prefix and drops those tokens from its chunk. Lanes are registered
        one after the other, so a lane may share pages another lane fills in this prefill.
        Returns (state, the lanes that do)."""
        self._reads_from(state)
        P, filling, later = self.page_size, set(), set()
        for b, chunk in enumerate(chunks):
            if not chunk:
                continue
            if reset[b] and starts[b] == 0:
                n = self.pages.share_prefix(b, chunk)
                chunks[b], starts[b] = chunk[n:], n
                if filling.intersection(self.pages.table[b, : n // P].tolist()):
                    later.add(b)
            start, stop = int(starts[b]), int(starts[b]) + len(chunks[b])
            self.pages.prepare_write(b, start, stop)
            self.pages.wrote(b, start, chunks[b])
            filling.update(self.pages.table[b, start // P: -(-stop // P)].tolist())
        return self._sync_pages(state), later

    def _pages_for_decode(self, state, position):
        self._reads_from(state)
        for b in np.flatnonzero(np.asarray(state.active)):
            self.pages.prepare_write(b, int(position[b]), min(int(position[b]) + self.chunk, self.max_len))
        return self._sync_pages(state)

    def _sync_pages(self, state):
        """Copy-on-write copies and host pages onto the device, then the page table."""
        copies, restores = self.pages.pop_work()
        for group in _groups(copies, self.max_len // self.page_size):
            src, dst = self._padded([s for s, _ in group]), self._padded([d for _, d in group])
            state = self._copy_pages(state, src, dst)
        for group in _groups(restores, self.max_len // self.page_size):
            ids = self._padded([page for page, _ in group])
            k, v = (self._padded_pages([kv[i] for _, kv in group]) for i in (0, 1))
            state = self._write_pages(state, ids, k, v)
        if self.pages.changed:
            table = jnp.asarray(self.pages.table)
            if self.layout is not None:
                table = jax.device_put(table, self.layout.replicated)
            state = state.replace(cache=state.cache._replace(page_table=table))
            self.pages.changed = False
        return state

    def _padded(self, pages):
        """Page ids padded to a fixed count with "no page" (writes there are dropped)."""
        out = np.full(self.max_len // self.page_size, self.n_pages, np.int32)
        out[: len(pages)] = pages
        return out

    def _padded_pages(self, arrays):
        stacked = np.stack(arrays, axis=2)  # [layers, kv_heads, n, page_size, head_dim]
        pad = self.max_len // self.page_size - stacked.shape[2]
        return np.pad(stacked, [(0, 0), (0, 0), (0, pad), (0, 0), (0, 0)])

    def _read_page(self, state, page: int):
        k, v = self._read_pages(state.cache, self._padded([page]))
        return np.asarray(k[:, :, 0]), np.asarray(v[:, :, 0])

    @staticmethod
    def _read_pages_impl(cache, ids):
        return cache.k.at[:, :, ids].get(mode="fill", fill_value=0), cache.v.at[:, :, ids].get(mode="fill", fill_value=0)

    @staticmethod
    def _write_pages_impl(state, ids, k, v):
        cache = state.cache
        return state.replace(cache=cache._replace(
            k=cache.k.at[:, :, ids].set(k.astype(cache.k.dtype), mode="drop"),
            v=cache.v.at[:, :, ids].set(v.astype(cache.v.dtype), mode="drop")))

    @staticmethod
    def _copy_pages_impl(state, src, dst):
        cache = state.cache
        return state.replace(cache=cache._replace(
            k=cache.k.at[:, :, dst].set(cache.k.at[:, :, src].get(mode="fill", fill_value=0), mode="drop"),
            v=cache.v.at[:, :, dst].set(cache.v.at[:, :, src].get(mode="fill", fill_value=0), mode="drop")))

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

    def _prefill_impl(self, params, state, rows_R, tokens_RxT, start_R, length_R, prompt_R, reset_R, requests):
        """Prefill rows `rows_R` of the lanes (all of them, in order, when R == lanes)."""
        R, T = tokens_RxT.shape
        self.compilations[("prefill", (R, T))] += 1
        subset = R < self.lanes  # only for a paged cache: its rows are just the page table's
        cache = state.cache._replace(page_table=state.cache.page_table[rows_R]) if subset else state.cache
        offsets = jnp.arange(T)[None, :]
        valid_RxT = offsets < length_R[:, None]
        logits_RxV, cache = self.model.apply(
            {"params": params}, tokens_RxT, start_R[:, None] + offsets, valid_RxT.astype(jnp.int32),
            prompt_R[:, None] & valid_RxT, cache=cache, logits_at_B=jnp.maximum(length_R - 1, 0),
        )
        if not subset:
            state = state.replace(cache=cache)
            return self._sample_and_advance(logits_RxV, state, requests, length_R > 0, start_R + length_R, reset_R)
        lanes = ("next_token", "position", "generated", "active")
        rows = state.replace(cache=cache, **{name: getattr(state, name)[rows_R] for name in lanes})
        rows = self._sample_and_advance(logits_RxV, rows, jax.tree_util.tree_map(lambda x: x[rows_R], requests),
                                        length_R > 0, start_R + length_R, reset_R)
        return state.replace(
            cache=rows.cache._replace(page_table=state.cache.page_table),
            **{name: getattr(state, name).at[rows_R].set(getattr(rows, name)) for name in lanes},
        )

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


def _groups(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]
