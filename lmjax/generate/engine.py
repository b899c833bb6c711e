"""The lane engine: continuous batching over a fixed number of lanes, with tool calls.

Each lane holds one dialog. The device decodes all lanes in chunks (`Decoder.decode`); the host
looks at the lanes only between chunks. There it

  * refills finished lanes from the queue (the new prompts are prefilled together),
  * starts a tool call for every lane that ended an assistant turn with the dialog format's
    call token (`<|database|>` for byte-level dialogs): the format says what the query is
    (that turn's text); the call runs in its own thread, so a slow tool delays only its own
    lane while the others keep decoding,
  * writes every finished tool reply into its lane's cache at the lane's position (the call
    token, then the format's reply tokens: `<|database|>` reply `<|assistant|>`, one prefill)
    and lets the lane decode on.

With a paged cache (Decoder(page_size=...)) the engine also admits a request only when the
pages it may need (prompt, max_new_tokens and one decode chunk, less the pages of a prefix
that running lanes already hold) are free, finished lanes give their pages back at once, and a
lane waiting on a tool call is paged out to host memory when a queued request or another
lane's tool reply needs its pages, and paged back in when its reply is ready and pages are free.

A malformed query, an unknown person, a tool exception or a time-out becomes the reply
`error: ...`, which the model reads like any other reply: the engine never raises for them.
A call past its time-out is abandoned, not stopped (Python cannot stop a thread): its thread
runs on, so a tool must let other calls run meanwhile (lmjax/tools/: the facts database gives
each lookup its own connection).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from lmjax.dialog import format_for
from lmjax.generate.decoder import Decoder, LaneRequests, request_key
from lmjax.generate.sampling import SamplingParams, check_sampling


@dataclasses.dataclass
class Request:
    prompt: Sequence[int]  # token ids, prefilled as one prompt chunk
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    id: Any = None


@dataclasses.dataclass
class Completion:
    id: Any
    prompt: list[int]
    tokens: list[int]  # everything after the prompt: generated tokens and injected tool replies
    text: str
    finish_reason: str  # stop | length | cache_full | tool_call (a call with no tool attached)
    tool_calls: list[dict] = dataclasses.field(default_factory=list)  # {query, reply, ok, seconds}


def check_tool_timeout(seconds: float) -> None:
    """Raise ValueError unless `seconds` is a usable tool time-out."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"tool_timeout_s must be a positive, finite number of seconds, got {seconds!r}.")


class ToolRunner:
    """Runs one tool call per thread; a call past its time-out is answered with an error."""

    def __init__(self, tool: Callable[[str], str], timeout_s: float):
        check_tool_timeout(timeout_s)
        self.tool, self.timeout_s = tool, timeout_s

    def start(self, query: str):
        future = concurrent.futures.Future()

        def run():
            try:
                future.set_result(("ok", self.tool(query)))
            except Exception as error:  # noqa: BLE001 - any tool failure becomes a reply
                future.set_result(("error", error))

        # A daemon thread per call: a hung tool can never occupy a pool the other lanes need.
        threading.Thread(target=run, daemon=True).start()
        return future, time.monotonic() + self.timeout_s

    def reply(self, future):
        """(reply text, ok) for a finished or timed-out call."""
        if not future.done():
            return f"error: the tool timed out after {self.timeout_s:g} s", False
        status, value = future.result()
        if status == "ok":
            return str(value), True
        if type(value).__name__ == "ToolError":
            return f"error: {value}", False
        return f"error: the tool failed ({type(value).__name__}: {value})", False


@dataclasses.dataclass
class _Lane:
    index: int  # position of the request in the caller's list
    request: Request
    tokens: list[int]  # prompt + everything after it; the last one is not in the cache yet
    n_prompt: int
    n_injected: int = 0  # tool-reply tokens written by the engine, not sampled
    tool_calls: list = dataclasses.field(default_factory=list)
    pending_call: tuple | None = None  # (future, deadline, query, started)
    reserve: int = 0  # paged cache: pages this lane may come to hold
    saved: Any = None  # paged cache: what Decoder.page_in needs while the lane is paged out
    reply: list | None = None  # a tool reply waiting for pages before it is written
    shared: int = 0  # paged cache: pages of its prefix other lanes held when it was admitted

    @property
    def waiting(self) -> bool:
        """On a tool call, or on pages to write its reply."""
        return self.pending_call is not None or self.reply is not None


def validate_requests(requests: Sequence[Request], vocab_size: int, max_len: int):
    for i, r in enumerate(requests):
        name = f"Prompt {r.id!r}" if r.id is not None else f"Prompt {i}"
        if len(r.prompt) == 0:
            raise ValueError(f"{name} is empty; give at least one token.")
        if len(r.prompt) > max_len:
            raise ValueError(
                f"{name} has {len(r.prompt):,} tokens but the cache holds {max_len:,}; "
                f"raise max_len or shorten the prompt."
            )
        bad = [t for t in r.prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"{name} has token id {bad[0]} outside the model's vocabulary [0, {vocab_size}).")
        if r.max_new_tokens < 1:
            raise ValueError(f"{name}: max_new_tokens must be at least 1, got {r.max_new_tokens}.")
        check_sampling(r.temperature, r.top_k, r.top_p, r.min_p)


class LaneEngine:
    def __init__(self, decoder: Decoder, params, tokenizer, *, tool=None, tool_timeout_s: float = 5.0,
                 tool_grace_s: float = 0.005, dialog_format=None):
        self.decoder, self.params, self.tokenizer = decoder, params, tokenizer
        check_tool_timeout(tool_timeout_s)  # also without a tool: a bad setting is an error either way
        self.tool_grace_s = tool_grace_s
        self.format = dialog_format or format_for(tokenizer)  # lmjax.dialog.DialogFormat
        missing = set(self.format.stop_ids) - set(decoder.stop_ids.tolist())
        if missing:
            raise ValueError(f"The decoder must stop on the dialog's stop tokens; missing {sorted(missing)}.")
        self.tools = ToolRunner(tool, tool_timeout_s) if tool is not None else None
        self.stats = collections.Counter()

    def generate(self, requests: Sequence[Request], *, progress: bool = False, on_tokens=None) -> list[Completion]:
        """Completions in the order of `requests`. `on_tokens(i, ids)` (optional) is called on the
        host as request i's lane gains tokens (sampled or injected), e.g. to stream them."""
        d = self.decoder
        validate_requests(requests, d.vocab_size, d.max_len)
        queue = collections.deque(enumerate(requests))
        results: list[Completion | None] = [None] * len(requests)
        lanes: list[_Lane | None] = [None] * d.lanes
        asks = LaneRequests.empty(d.lanes)
        sampling = {k: np.array(v) for k, v in vars(asks.sampling).items()}
        keys, max_new = np.array(asks.keys), np.array(asks.max_new)
        state = d.init_state()
        bar = tqdm(total=len(requests), disable=not progress, desc="generate", dynamic_ncols=True)
        started = time.perf_counter()

        def finish(b, reason):
            lane = lanes[b]
            after = lane.tokens[lane.n_prompt :]
            results[lane.index] = Completion(
                lane.request.id, lane.tokens[: lane.n_prompt], after, self.tokenizer.decode(after), reason, lane.tool_calls
            )
            lanes[b] = None
            d.release_lane(b)
            bar.update(1)

        def extend(b, new_tokens):
            lanes[b].tokens.extend(new_tokens)
            if on_tokens is not None and new_tokens:
                on_tokens(lanes[b].index, list(new_tokens))

        def settle(b, active):
            """After new tokens: keep decoding, start a tool call, or finish the lane."""
            lane = lanes[b]
            if active:
                return
            last, request = lane.tokens[-1], lane.request
            n_generated = len(lane.tokens) - lane.n_prompt - lane.n_injected
            if last == self.format.call_id and n_generated < request.max_new_tokens:
                if self.tools is None:
                    return finish(b, "tool_call")
                query = self.format.tool_query(lane.tokens)
                future, deadline = self.tools.start(query)
                lane.pending_call = (future, deadline, query, time.perf_counter())
                self.stats["tool_calls"] += 1
                return
            if last in d.stop_ids and last != self.format.call_id:
                return finish(b, "stop")
            if n_generated >= request.max_new_tokens:
                return finish(b, "length")
            return finish(b, "cache_full")

        try:
            while queue or any(lane is not None for lane in lanes):
                chunks, starts = [[] for _ in range(d.lanes)], np.zeros(d.lanes, np.int32)
                prompt, reset = np.zeros(d.lanes, bool), np.zeros(d.lanes, bool)
                self._grace_for_new_calls(lanes)
                pages = _PageBudget(d, lanes) if d.page_size else None
                for b in range(d.lanes):
                    if lanes[b] is None and queue:
                        admitted = pages.admit(queue[0][1], state, self.stats) if pages is not None else (0, 0)
                        if admitted is None:
                            continue
                        index, r = queue.popleft()
                        lanes[b] = _Lane(index, r, [int(t) for t in r.prompt], len(r.prompt))
                        lanes[b].reserve, lanes[b].shared = admitted
                        chunks[b], prompt[b], reset[b] = list(lanes[b].tokens), True, True
                        keys[b], max_new[b] = request_key(r.seed), r.max_new_tokens
                        for name in sampling:
                            sampling[name][b] = getattr(r, name)
                    elif lanes[b] is not None and lanes[b].waiting:
                        injection = lanes[b].reply or self._tool_reply_if_ready(lanes[b])
                        if injection is None:
                            continue
                        start = len(lanes[b].tokens) - 1  # the call token is sampled, not yet cached
                        if start + len(injection) + 1 > d.max_len:
                            finish(b, "cache_full")
                            continue
                        if pages is not None:
                            lanes[b].reply = injection
                            state, ready = pages.resume(b, len(injection) + 1, state, self.stats)
                            if not ready:
                                continue
                            lanes[b].reply, lanes[b].pending_call = None, None
                        chunks[b], starts[b] = [self.format.call_id] + injection, start
                        extend(b, injection)
                        lanes[b].n_injected += len(injection)
                asks = LaneRequests(keys, max_new, SamplingParams(**sampling))
                written = [b for b in range(d.lanes) if chunks[b]]
                if written:
                    state, first = d.prefill(self.params, state, chunks, starts, asks, prompt=prompt, reset=reset)
                    self.stats["prefills"] += 1
                    active = np.asarray(state.active)
                    for b in written:
                        extend(b, [int(first[b])])
                        settle(b, active[b])
                if any(lane is not None and not lane.waiting for lane in lanes):
                    state, out, counts = d.decode(self.params, state, asks)
                    self.stats["decode_chunks"] += 1
                    active = np.asarray(state.active)
                    for b, lane in enumerate(lanes):
                        if lane is not None and not lane.waiting:
                            extend(b, out[b, : counts[b]].tolist())
                            settle(b, active[b])
                elif any(lane is not None for lane in lanes) and not (queue and None in lanes):
                    if not self._wait_for_a_tool(lanes):
                        # every lane waits for pages only lanes that wait themselves could free
                        b = next(b for b, lane in enumerate(lanes) if lane is not None and lane.reply)
                        finish(b, "cache_full")
        finally:
            bar.close()
        self.stats["seconds"] += time.perf_counter() - started
        self.stats["requests"] += len(requests)
        return results

    def _tool_reply_if_ready(self, lane):
        """Tokens to inject after the call token (the format's reply tokens), or None to wait."""
        future, deadline, query, started = lane.pending_call
        if not future.done() and time.monotonic() < deadline:
            return None
        reply, ok = self.tools.reply(future)
        injection = self.format.tool_reply(reply)
        lane.tool_calls.append(
            {"query": query, "reply": reply, "ok": ok, "seconds": time.perf_counter() - started}
        )
        lane.pending_call = None
        return injection

    def _grace_for_new_calls(self, lanes):
        """Give calls started at the last chunk boundary a moment: a fast tool (a SQLite lookup
        takes microseconds) is then answered now instead of one decode chunk later."""
        fresh = [lane.pending_call[0] for lane in lanes if lane is not None and lane.pending_call is not None
                 and not lane.pending_call[0].done()]
        if fresh:
            concurrent.futures.wait(fresh, timeout=self.tool_grace_s)

    @staticmethod
    def _wait_for_a_tool(lanes) -> bool:
        """Every busy lane waits: sleep until a tool answers or the first deadline. False when no
        lane waits on a tool (they all wait for pages)."""
        pending = [lane.pending_call for lane in lanes if lane is not None and lane.pending_call is not None]
        if not pending:
            return False
        timeout = max(0.0, min(deadline for _, deadline, _, _ in pending) - time.monotonic())
        concurrent.futures.wait([f for f, _, _, _ in pending], timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return True


class _PageBudget:
    """Pages of a paged decoder that the engine can still promise (module doc): the free and
    evictable pages less what running lanes may still take (`reserve` less what they hold)."""

    def __init__(self, decoder, lanes):
        self.d, self.lanes, self.pool = decoder, lanes, decoder.pages
        self.round_keys = set()  # prefix pages that lanes admitted in this round will fill

    def pages(self, n_slots: int) -> int:
        return -(-min(n_slots, self.d.max_len) // self.d.page_size)

    def spare(self) -> int:
        owed = sum(max(0, lane.reserve - max(self.pool.held(b), lane.shared))
                   for b, lane in enumerate(self.lanes) if lane is not None and lane.saved is None)
        return self.pool.available() - owed

    def admit(self, request, state, stats):
        """(reserve, shared pages) for a lane that takes `request`, or None when it must wait."""
        prompt = [int(t) for t in request.prompt]
        P = self.d.page_size
        shared = 0
        for key in self.pool.prefix_keys(prompt, (len(prompt) - 1) // P):
            if key not in self.round_keys and not self.pool.held_by_a_lane(key):
                break
            shared += 1
        need = self.pages(len(prompt) + request.max_new_tokens + self.d.chunk)
        if not self._room_for(need - shared, state, stats):
            return None
        self.round_keys.update(self.pool.prefix_keys(prompt, len(prompt) // P))
        return need, shared

    def resume(self, b: int, n_tokens: int, state, stats):
        """(state, ready): lane b, back from a tool, can write `n_tokens` and decode on (paged
        back in first if it was paged out)."""
        lane = self.lanes[b]
        generated = len(lane.tokens) - lane.n_prompt - lane.n_injected
        need = self.pages(len(lane.tokens) - 1 + n_tokens + lane.request.max_new_tokens - generated + self.d.chunk)
        extra = need if lane.saved is not None else need - max(lane.reserve, self.pool.held(b))
        if not self._room_for(extra, state, stats, keep=b):
            return state, False
        if lane.saved is not None:
            state, lane.saved = self.d.page_in(state, b, lane.saved), None
            stats["page_ins"] += 1
        lane.reserve = max(lane.reserve, need)
        return state, True

    def _room_for(self, n: int, state, stats, keep: int = -1) -> bool:
        """Whether `n` more pages can be promised, paging out lanes that wait on a tool if needed."""
        for b, lane in enumerate(self.lanes):
            if self.spare() >= n:
                return True
            if (b != keep and lane is not None and lane.pending_call is not None and lane.saved is None
                    and self.pool.share_prefixes and self.pool.held(b)):
                lane.saved = self.d.page_out(state, b)
                stats["page_outs"] += 1
        return self.spare() >= n
