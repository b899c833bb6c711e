"""Speculative decoding with a draft model, jitted and static-shape over a fixed number of lanes.

Each step, per lane: the draft proposes `k` tokens autoregressively (k small forward passes),
the target scores the last accepted token and the k drafts in one pass of k+1 positions
(writing their keys and values into its cache), and `accept_reject` keeps the longest prefix
of drafts the target agrees with, plus one token of the target's own: the correction at the
first rejection, or a bonus token after k acceptances. A lane thus gains 1 to k+1 tokens per
target pass, and its output is the target's alone: token for token when greedy, in
distribution when sampling (the rule of Leviathan et al. 2023 / Chen et al. 2023: accept draft
d with probability min(1, p(d)/q(d)), else draw from max(0, p - q) renormalised).

Rollback costs nothing: slot j of a KV cache holds the token at position j, and a query at
position p attends only to slots <= p (`lmjax.models.masks.cache_attention_mask`). A lane whose
drafts were rejected just moves its `position` back; the rejected slots lie beyond every later
query until they are overwritten. The draft cache lags its lane by at most one token (the k-th
draft is proposed but never fed back); the draft's first pass of each step therefore feeds the
chunk [token at position-1, token at position], rewriting the one slot that may be missing.

Lanes accept different numbers of drafts, so everything stays [B]-shaped: per-lane positions,
counts of tokens emitted per step, and an output buffer [B, rounds * (k+1)] per call. The random
key of a lane's step is `fold_in(request_key, generated)`, so a request's tokens depend on its
own seed only. Only position-indexed caches (the Transformer's `KVCache`) can roll back this
way; recurrent models (Mamba, RNN) would need their states snapshotted per draft position.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.generate.cache import init_cache
from lmjax.generate.decoder import LaneRequests, request_key
from lmjax.generate.sampling import SamplingParams, check_sampling, filtered_probs, sample
from lmjax.xla_flags import decoding_compiler_options


@flax.struct.dataclass
class SpecState:
    target_cache: Any  # KVCache of the target: every position < `position` written
    draft_cache: Any  # KVCache of the draft: every position < `position` - 1 written
    next_token: jax.Array  # [B] the newest token: reported, at `position`, in neither cache
    prev_token: jax.Array  # [B] the token at `position` - 1 (the draft rewrites it each step)
    position: jax.Array  # [B] int32
    generated: jax.Array  # [B] tokens emitted for the lane's request (the prefill's included)
    active: jax.Array  # [B] bool
    drafted: jax.Array  # [B] drafts proposed to the target (k per step)
    accepted: jax.Array  # [B] drafts the target accepted
    target_passes: jax.Array  # [B] verification passes (decode steps) the lane took part in


def accept_reject(p_BxKp1xV, q_BxKxV, drafts_BxK, uniforms_BxK, key_B, greedy_B):
    """The speculative sampling rule, per lane. `p[:, j]`: the target's distribution for the token
    after j drafts (j = 0..k); `q[:, j]`: the draft's for draft j, which `drafts[:, j]` was drawn
    from. Draft j is accepted when u_j * q_j(d_j) < p_j(d_j) (probability min(1, p/q)); the first
    rejection stops the lane, which then draws its correction from max(0, p_j - q_j)
    (renormalised); with all k accepted, the bonus token is drawn from p_k. Greedy lanes accept
    a draft iff it is the target's argmax and correct with the argmax.

    Returns (accepted count n [B], emitted [B, k+1]: drafts[:n] then the correction at index n;
    entries after n are the corrections too, never read)."""
    B, K = drafts_BxK.shape
    rows = jnp.arange(B)[:, None]
    steps = jnp.arange(K)[None, :]
    p_draft = p_BxKp1xV[rows, steps, drafts_BxK]
    q_draft = q_BxKxV[rows, steps, drafts_BxK]
    target_argmax_BxKp1 = jnp.argmax(p_BxKp1xV, axis=-1).astype(jnp.int32)
    ok_BxK = jnp.where(greedy_B[:, None], drafts_BxK == target_argmax_BxKp1[:, :K], uniforms_BxK * q_draft < p_draft)
    n_B = jnp.sum(jnp.cumprod(ok_BxK.astype(jnp.int32), axis=1), axis=1)
    p_n = p_BxKp1xV[jnp.arange(B), n_B]
    q_pad = jnp.concatenate([q_BxKxV, jnp.zeros_like(q_BxKxV[:, :1])], axis=1)  # no draft after k
    residual = jnp.maximum(p_n - q_pad[jnp.arange(B), n_B], 0.0)
    # A rejection implies p_n(d) < q_n(d), hence p_n != q_n and some positive residual mass;
    # the fallback to p_n only keeps the never-used branch (n = k with p == q) well defined.
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_n)
    drawn = jax.vmap(jax.random.categorical)(key_B, jnp.log(residual)).astype(jnp.int32)
    correction = jnp.where(greedy_B, target_argmax_BxKp1[jnp.arange(B), n_B], drawn)
    drafts_pad = jnp.concatenate([drafts_BxK, jnp.zeros_like(drafts_BxK[:, :1])], axis=1)
    emitted = jnp.where(jnp.arange(K + 1)[None, :] < n_B[:, None], drafts_pad, correction[:, None])
    return n_B, emitted


def probs_for(logits_BxV, sampling: SamplingParams):
    """`filtered_probs`, skipping its vocabulary sort when every lane is greedy (one-hot argmax)."""
    greedy = lambda: jax.nn.one_hot(jnp.argmax(logits_BxV, axis=-1), logits_BxV.shape[-1], dtype=logits_BxV.dtype)  # noqa: E731
    return jax.lax.cond(jnp.all(sampling.temperature == 0), greedy, lambda: filtered_probs(logits_BxV, sampling))


def propose(logits_BxV, keys_B, sampling: SamplingParams):
    """(draft tokens [B], the distribution q [B, V] they were drawn from): `sample`'s rule, with
    its filtered distribution kept for the acceptance test."""
    greedy_token = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def greedy():
        return greedy_token, jax.nn.one_hot(greedy_token, logits_BxV.shape[-1], dtype=logits_BxV.dtype)

    def sampled():
        q = filtered_probs(logits_BxV, sampling)
        drawn = jax.vmap(jax.random.categorical)(keys_B, jnp.log(q)).astype(jnp.int32)
        return jnp.where(sampling.temperature == 0, greedy_token, drawn), q

    return jax.lax.cond(jnp.all(sampling.temperature == 0), greedy, sampled)


@functools.lru_cache(maxsize=8)
def decoder_for(target, draft, lanes: int, max_len: int, k: int, stop_ids=(), rounds: int = 4) -> "SpeculativeDecoder":
    """A SpeculativeDecoder, reused by later calls with the same arguments (its programs are
    compiled once; Flax modules hash by their config)."""
    return SpeculativeDecoder(target, draft, lanes, max_len, k, stop_ids=stop_ids, rounds=rounds)


def _is_kv_cache(model):
    spec = model.cache_spec(1, 1)
    return hasattr(spec, "_fields") and getattr(spec, "_fields", None) == ("k", "v")


class SpeculativeDecoder:
    """prefill/decode of `target` with proposals from `draft`: `lanes` lanes of `max_len` slots,
    `k` drafts per step, up to `rounds` steps per decode call."""

    def __init__(self, target, draft, lanes: int, max_len: int, k: int = 4, *, stop_ids=(), rounds: int = 4,
                 min_bucket: int = 16, sample_vocab=None):
        if lanes <= 0 or max_len <= 0 or k <= 0 or rounds <= 0:
            raise ValueError(f"lanes, max_len, k and rounds must be positive, got {lanes}, {max_len}, {k}, {rounds}.")
        for name, model in (("target", target), ("draft", draft)):
            if not hasattr(model, "cache_spec") or not _is_kv_cache(model):
                raise ValueError(
                    f"Speculative decoding rolls back a position-indexed KV cache; the {name} "
                    f"({type(model).__name__}) has none. Use transformer models for both."
                )
        if draft.cfg.vocab_size != target.cfg.vocab_size:
            raise ValueError(
                f"The draft's vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                f"({target.cfg.vocab_size}); both must use the same tokenizer and vocab_size."
            )
        self.target, self.draft = target, draft
        self.lanes, self.max_len, self.k, self.rounds = lanes, max_len, k, rounds
        self.vocab_size = target.cfg.vocab_size
        self.sample_vocab = min(sample_vocab or self.vocab_size, self.vocab_size)
        self.stop_ids = np.asarray(sorted(set(stop_ids)) or [-1], np.int32)
        self.buckets = [min_bucket * 2**i for i in range(32) if min_bucket * 2**i < max_len] + [max_len]
        self.compilations = collections.Counter()
        self._init = jax.jit(self._init_impl)
        fast = decoding_compiler_options()  # lmjax.xla_flags: YNNPACK's dots on CPU
        self._prefill = jax.jit(self._prefill_impl, donate_argnums=(2,), compiler_options=fast)
        self._decode = jax.jit(self._decode_impl, donate_argnums=(2,), compiler_options=fast)

    def init_state(self) -> SpecState:
        return self._init()

    def _init_impl(self) -> SpecState:
        B = self.lanes
        zeros = jnp.zeros((B,), jnp.int32)
        return SpecState(
            target_cache=init_cache(self.target, B, self.max_len), draft_cache=init_cache(self.draft, B, self.max_len),
            next_token=zeros, prev_token=zeros, position=zeros, generated=zeros, active=jnp.zeros((B,), bool),
            drafted=zeros, accepted=zeros, target_passes=zeros,
        )

    def bucket(self, n: int) -> int:
        for size in self.buckets:
            if n <= size:
                return size
        raise ValueError(f"{n} tokens do not fit the cache of {self.max_len} slots; raise max_len or shorten the prompt.")

    # -- host-facing calls ---------------------------------------------------------------------

    def prefill(self, target_params, draft_params, state, chunks, starts, requests, *, prompt=None, reset=None):
        """Like `Decoder.prefill`: write `chunks[b]` into both caches of lane b at `starts[b]`
        (empty chunks leave a lane untouched) and sample its next token from the target.
        Returns (state, next_token [B] as numpy)."""
        B = self.lanes
        lengths = np.asarray([len(c) for c in chunks], np.int32)
        T = self.bucket(max(int(lengths.max()), 1))
        tokens = np.zeros((B, T), np.int32)
        for b, chunk in enumerate(chunks):
            tokens[b, : len(chunk)] = chunk
        prompt = np.zeros(B, bool) if prompt is None else np.asarray(prompt, bool)
        reset = np.zeros(B, bool) if reset is None else np.asarray(reset, bool)
        state = self._prefill(target_params, draft_params, state, tokens, np.asarray(starts, np.int32), lengths, prompt,
                              reset, requests)
        return state, np.asarray(state.next_token)

    def decode(self, target_params, draft_params, state, requests):
        """Up to `rounds` speculative steps for every active lane, stopping early once none is
        active. Returns (state, tokens [B, rounds*(k+1)], counts [B]): lane b produced
        tokens[b, :counts[b]]."""
        state, out, counts = self._decode(target_params, draft_params, state, requests)
        return state, np.asarray(out), np.asarray(counts)

    # -- traced ---------------------------------------------------------------------------------

    def _mask_vocab(self, logits):
        if self.sample_vocab < self.vocab_size:
            return jnp.where(jnp.arange(self.vocab_size) < self.sample_vocab, logits, -jnp.inf)
        return logits

    def _prefill_impl(self, target_params, draft_params, state, tokens_BxT, start_B, length_B, prompt_B, reset_B,
                      requests):
        # The target's part is `Decoder._prefill_impl` (its first token is sampled with the same
        # key, so it equals the plain decoder's); the draft only writes its cache.
        T = tokens_BxT.shape[1]
        self.compilations[("prefill", T)] += 1
        offsets = jnp.arange(T)[None, :]
        valid_BxT = offsets < length_B[:, None]
        positions = start_B[:, None] + offsets
        last = jnp.maximum(length_B - 1, 0)
        args = (tokens_BxT, positions, valid_BxT.astype(jnp.int32), prompt_B[:, None] & valid_BxT)
        logits_BxV, target_cache = self.target.apply({"params": target_params}, *args, cache=state.target_cache, logits_at_B=last)
        _, draft_cache = self.draft.apply({"params": draft_params}, *args, cache=state.draft_cache, logits_at_B=last)
        written = length_B > 0
        generated = jnp.where(reset_B, 0, state.generated)
        keys = jax.vmap(jax.random.fold_in)(requests.keys, generated)
        token = sample(self._mask_vocab(logits_BxV), keys, requests.sampling)
        new_position = start_B + length_B
        stop = jnp.isin(token, self.stop_ids) | (generated + 1 >= requests.max_new) | (new_position >= self.max_len)
        zero = jnp.zeros_like(state.drafted)
        w = lambda new, old: jnp.where(written, new, old)  # noqa: E731
        return state.replace(
            target_cache=target_cache, draft_cache=draft_cache,
            next_token=w(token, state.next_token), prev_token=w(tokens_BxT[jnp.arange(self.lanes), last], state.prev_token),
            position=w(new_position, state.position), generated=w(generated + 1, state.generated),
            active=w(~stop, state.active),
            drafted=jnp.where(reset_B, zero, state.drafted), accepted=jnp.where(reset_B, zero, state.accepted),
            target_passes=jnp.where(reset_B, zero, state.target_passes),
        )

    def _draft_proposals(self, draft_params, state, keys_BxK, sampling):
        """k drafts [B, k] and the draft's distributions q [B, k, V] they were drawn from."""
        B, K = self.lanes, self.k
        active = state.active.astype(jnp.int32)
        pos = state.position

        # First pass: [token at position-1, token at position] (see the module doc).
        tokens = jnp.stack([state.prev_token, state.next_token], axis=1)
        positions = jnp.stack([pos - 1, pos], axis=1)
        logits, cache = self.draft.apply({"params": draft_params}, tokens, positions, jnp.stack([active, active], 1),
                                         cache=state.draft_cache, logits_at_B=jnp.ones((B,), jnp.int32))
        token, q = propose(self._mask_vocab(logits), keys_BxK[:, 0], sampling)
        drafts = jnp.zeros((B, K), jnp.int32).at[:, 0].set(token)
        qs = jnp.zeros((B, K, self.vocab_size), q.dtype).at[:, 0].set(q)

        def step(i, carry):
            cache, token, drafts, qs = carry
            logits, cache = self.draft.apply({"params": draft_params}, token[:, None], (pos + i)[:, None], active[:, None],
                                             cache=cache, logits_at_B=jnp.zeros((B,), jnp.int32))
            token, q = propose(self._mask_vocab(logits), keys_BxK[:, i], sampling)
            return cache, token, drafts.at[:, i].set(token), qs.at[:, i].set(q)

        cache, _, drafts, qs = jax.lax.fori_loop(1, K, step, (cache, token, drafts, qs))
        return drafts, qs, cache

    def _step(self, target_params, draft_params, state, requests):
        """One speculative step: (state, emitted [B, k+1], counts [B])."""
        B, K = self.lanes, self.k
        active, pos = state.active, state.position
        step_keys = jax.vmap(jax.random.fold_in)(requests.keys, state.generated)
        split = jax.vmap(lambda key: jax.random.split(key, K + 2))(step_keys)  # [B, K+2, 2]
        drafts, q_BxKxV, draft_cache = self._draft_proposals(draft_params, state, split[:, :K], requests.sampling)

        tokens = jnp.concatenate([state.next_token[:, None], drafts], axis=1)
        positions = pos[:, None] + jnp.arange(K + 1)[None, :]
        valid = jnp.broadcast_to(active[:, None], (B, K + 1)).astype(jnp.int32)
        logits_BxKp1xV, target_cache = self.target.apply({"params": target_params}, tokens, positions, valid,
                                                         cache=state.target_cache)
        logits_BxKp1xV = self._mask_vocab(logits_BxKp1xV)
        sampling = requests.sampling
        p_BxKp1xV = jax.vmap(probs_for, in_axes=(1, None), out_axes=1)(logits_BxKp1xV, sampling)
        uniforms = jax.vmap(lambda key: jax.random.uniform(key, (K,)))(split[:, K])
        n, emitted = accept_reject(p_BxKp1xV, q_BxKxV, drafts, uniforms, split[:, K + 1], sampling.temperature == 0)

        # How many of the n+1 tokens the lane keeps: up to its first stop token, max_new, or
        # the last position the cache can take (the Decoder's rules, token by token).
        index = jnp.arange(K + 1)[None, :]
        is_stop = jnp.isin(emitted, self.stop_ids) & (index <= n[:, None])
        first_stop = jnp.min(jnp.where(is_stop, index, K + 1), axis=1)
        count = jnp.minimum(jnp.minimum(n + 1, first_stop + 1),
                            jnp.minimum(requests.max_new - state.generated, self.max_len - pos))
        count = jnp.where(active, jnp.maximum(count, 1), 0)
        generated = state.generated + count
        new_pos = pos + count
        stop = (first_stop < count) | (generated >= requests.max_new) | (new_pos >= self.max_len)
        rows = jnp.arange(B)
        last = emitted[rows, jnp.maximum(count - 1, 0)]
        before_last = jnp.where(count >= 2, emitted[rows, jnp.maximum(count - 2, 0)], state.next_token)
        w = lambda new, old: jnp.where(active, new, old)  # noqa: E731
        state = state.replace(
            target_cache=target_cache, draft_cache=draft_cache,
            next_token=w(last, state.next_token), prev_token=w(before_last, state.prev_token),
            position=w(new_pos, pos), generated=w(generated, state.generated), active=w(~stop, active),
            drafted=state.drafted + jnp.where(active, K, 0), accepted=state.accepted + jnp.where(active, n, 0),
            target_passes=state.target_passes + active,
        )
        return state, emitted, count

    def _decode_impl(self, target_params, draft_params, state, requests):
        B, K, R = self.lanes, self.k, self.rounds
        self.compilations[("decode", K, R)] += 1
        width = R * (K + 1)

        def body(carry):
            i, state, out, counts = carry
            state, emitted, count = self._step(target_params, draft_params, state, requests)
            cols = counts[:, None] + jnp.arange(K + 1)[None, :]
            cols = jnp.where(jnp.arange(K + 1)[None, :] < count[:, None], cols, width)  # past the end: dropped
            out = out.at[jnp.arange(B)[:, None], cols].set(emitted, mode="drop")
            return i + 1, state, out, counts + count

        def keep_going(carry):
            i, state, _, _ = carry
            return (i < R) & jnp.any(state.active)

        init = (0, state, jnp.zeros((B, width), jnp.int32), jnp.zeros((B,), jnp.int32))
        _, state, out, counts = jax.lax.while_loop(keep_going, body, init)
        return state, out, counts


class SpeculativeLanes:
    """A SpeculativeDecoder behind the interface the lane engine drives (that of `Decoder`), so
    continuous batching and tool calls work with a draft: `LaneEngine(SpeculativeLanes(spec),
    (target_params, draft_params), tokenizer, tool=...)`. A tool reply is written into both
    caches like a prompt chunk; the lane then decodes on with drafts."""

    page_size = 0  # contiguous caches only

    def __init__(self, speculative: SpeculativeDecoder):
        self.speculative = speculative
        self.lanes, self.max_len = speculative.lanes, speculative.max_len
        self.vocab_size, self.stop_ids = speculative.vocab_size, speculative.stop_ids

    def init_state(self) -> SpecState:
        return self.speculative.init_state()

    def prefill(self, params, state, chunks, starts, requests, *, prompt=None, reset=None):
        return self.speculative.prefill(*params, state, chunks, starts, requests, prompt=prompt, reset=reset)

    def decode(self, params, state, requests):
        return self.speculative.decode(*params, state, requests)

    def release_lane(self, b: int) -> None:
        pass


@dataclasses.dataclass
class SpeculativeStats:
    drafted: int  # drafts proposed to the target
    accepted: int  # drafts the target accepted
    target_passes: int  # verification passes, summed over lanes (prefill not counted)
    decoded_tokens: int  # tokens emitted by those passes

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_target_pass(self) -> float:
        return self.decoded_tokens / max(self.target_passes, 1)


def run_speculative(decoder: SpeculativeDecoder, target_params, draft_params, prompts, requests):
    """Prefill `prompts` (one per lane, at most `decoder.lanes`) and decode until every lane stops.
    Returns (token lists, SpeculativeStats)."""
    B = decoder.lanes
    chunks = [list(p) for p in prompts] + [[] for _ in range(B - len(prompts))]
    state = decoder.init_state()
    state, first = decoder.prefill(target_params, draft_params, state, chunks, np.zeros(B, np.int32), requests,
                                   prompt=[bool(c) for c in chunks], reset=[True] * B)
    out = [[int(first[b])] for b in range(len(prompts))]
    while np.asarray(state.active).any():
        state, tokens, counts = decoder.decode(target_params, draft_params, state, requests)
        for b in range(len(prompts)):
            out[b] += tokens[b, : counts[b]].tolist()
    n = len(prompts)
    drafted, accepted, passes = (np.asarray(x)[:n] for x in (state.drafted, state.accepted, state.target_passes))
    stats = SpeculativeStats(int(drafted.sum()), int(accepted.sum()), int(passes.sum()), sum(len(o) - 1 for o in out))
    return out, stats


def speculative_generate(target_model, target_params, draft_model, draft_params, prompts: Sequence[Sequence[int]],
                         max_new_tokens: int, k: int = 4, temperature: float = 0.0, seed: int = 0, *, top_k: int = 0,
                         top_p: float = 1.0, min_p: float = 0.0, stop_ids=(), max_len: int | None = None, rounds: int = 4):
    """Token lists (one per prompt, at most `max_new_tokens` each, the stop token included) and
    SpeculativeStats. Prompt i samples with seed `seed + i`. One lane per prompt; the cache
    holds `max_len` slots (default: the longest prompt + max_new_tokens, rounded up to 16)."""
    check_sampling(temperature, top_k, top_p, min_p)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("Every prompt needs at least one token.")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}.")
    max_len = max_len or -(-(max(len(p) for p in prompts) + max_new_tokens) // 16) * 16
    lanes = len(prompts)
    decoder = decoder_for(target_model, draft_model, lanes, max_len, k, tuple(sorted(set(stop_ids))), rounds)
    requests = LaneRequests(
        keys=np.stack([request_key(seed + i) for i in range(lanes)]),
        max_new=np.full(lanes, max_new_tokens, np.int32),
        sampling=SamplingParams.for_lanes(lanes, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p),
    )
    return run_speculative(decoder, target_params, draft_params, prompts, requests)
