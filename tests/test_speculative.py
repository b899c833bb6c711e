"""Speculative decoding (lmjax/generate/speculative.py) against the target decoding alone: token
for token when greedy, in distribution (exact enumeration) when sampling."""
import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_decoder import decode_all
from test_engine import FMT, PAD_TO, TOK, model_and_params, naive_dialog  # noqa: F401 (a fixture)

from lmjax.generate.decoder import Decoder, LaneRequests, request_key
from lmjax.generate.sampling import SamplingParams
from lmjax.generate.speculative import (
    SpeculativeDecoder, SpeculativeLanes, accept_reject, decoder_for, run_speculative, speculative_generate,
)
from lmjax.models.transformer import Transformer, TransformerConfig

# Unrolled layers: cheaper to compile than the scanned ones at these sizes.
TARGET = TransformerConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64, scan_layers=False)
DRAFT = TransformerConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=32, scan_layers=False)


@functools.cache
def random_model(cfg, seed, head_scale=1.0):
    """A model and random parameters of its shapes, drawn in numpy (jitting `model.init` costs
    seconds of compilation on 2 cores): unit embeddings and norms, kernels of std 1/sqrt(fan-in);
    `head_scale` multiplies the output head (sharper distributions)."""
    model = Transformer(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = 1 if "embedding" in name else int(np.prod(leaf.shape[:2 if "wo" in name else 1]))
        std = fan_in**-0.5 * (head_scale if "lm_head" in name else 1.0)
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


def target_alone(model, params, prompts, n_new, lanes, max_len, stop_ids=()):
    return decode_all(Decoder(model, lanes, max_len, chunk=8, stop_ids=stop_ids), params, prompts, n_new)


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9, 9, 9, 9, 9]]
N_NEW, MAX_LEN = 20, 24  # lane 1 (7 prompt tokens) reaches the cache's last slot before N_NEW


@functools.cache
def greedy_reference():
    model, params = random_model(TARGET, 0)
    return target_alone(model, params, PROMPTS, N_NEW, len(PROMPTS), MAX_LEN)


def greedy_requests():
    return LaneRequests.empty(len(PROMPTS)).replace(max_new=np.full(len(PROMPTS), N_NEW, np.int32))


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_greedy_equals_target_alone_with_a_different_draft():
    """A smaller random draft: nearly every draft is rejected, every step still emits the
    target's token; lanes of different prompt lengths stay in step, one reaches the cache's
    end like the plain decoder's; the second call reuses the compiled decoder."""
    (tm, tp), (dm, dp) = random_model(TARGET, 0), random_model(DRAFT, 1)
    for _ in range(2):
        out, stats = speculative_generate(tm, tp, dm, dp, PROMPTS, N_NEW, k=3, max_len=MAX_LEN, rounds=2)
        assert out == greedy_reference()
    assert len(out[1]) == MAX_LEN - len(PROMPTS[1]) + 1 < N_NEW
    assert stats.drafted > 0 and stats.acceptance_rate < 0.5  # the rejection path did the work
    assert stats.target_passes < sum(len(o) for o in out)
    assert decoder_for(tm, dm, len(PROMPTS), MAX_LEN, 3, (), 2).compilations[("decode", 3, 2)] == 1
    with pytest.raises(ValueError, match="at least one token"):
        speculative_generate(tm, tp, dm, dp, [[]], 8)


def test_draft_equal_to_target_accepts_everything_and_stops_at_stop_tokens():
    """Every draft accepted: k+1 tokens per target pass (bonus tokens, the draft cache's
    missing k-th slot rewritten). A stop token inside an accepted run ends its lane there,
    stop token included, as in the plain decoder."""
    tm, tp = random_model(TARGET, 0)
    reference = greedy_reference()
    stop = reference[0][6]
    expected = [r[: r.index(stop) + 1] if stop in r else r for r in reference]
    decoder = SpeculativeDecoder(tm, tm, len(PROMPTS), MAX_LEN, k=3, rounds=2, stop_ids=(stop,))
    out, stats = run_speculative(decoder, tp, tp, PROMPTS, greedy_requests())
    assert out == expected and len(out[0]) <= 7
    assert stats.acceptance_rate == 1.0
    assert stats.tokens_per_target_pass > 2.5


# -- the rule itself, on fixed distributions --------------------------------------------------

def chi_square_p_value(counts, probs):
    """P(chi-square >= observed) for counts against expected probabilities (bins with p > 0)."""
    counts, probs = np.asarray(counts, np.float64), np.asarray(probs, np.float64)
    n = counts.sum()
    seen = probs > 0
    assert counts[~seen].sum() == 0, "an outcome of probability 0 was drawn"
    expected = n * probs[seen]
    statistic = np.sum((counts[seen] - expected) ** 2 / expected)
    df = seen.sum() - 1
    return float(jax.scipy.special.gammaincc(df / 2.0, statistic / 2.0))


P = np.asarray([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]], np.float32)  # target, k=1: [step, V]
Q = np.asarray([[0.2, 0.2, 0.2, 0.4]], np.float32)  # draft, k=1


def run_rule(n, seed):
    """(accepted count [n], emitted [n, 2]) of `accept_reject` over n independent lanes, drafts from Q."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    drafts = jax.random.categorical(keys[0], jnp.log(Q[0]), shape=(n, 1)).astype(jnp.int32)
    uniforms = jax.random.uniform(keys[1], (n, 1))
    p, q = jnp.broadcast_to(P, (n,) + P.shape), jnp.broadcast_to(Q, (n,) + Q.shape)
    count, emitted = jax.jit(accept_reject)(p, q, drafts, uniforms, jax.random.split(keys[2], n), jnp.zeros(n, bool))
    return np.asarray(count), np.asarray(emitted), np.asarray(drafts), np.asarray(uniforms)


def test_rule_emits_the_target_distribution_on_fixed_vectors():
    """First token ~ p0 exactly; acceptance probability sum(min(p0, q0)); after an accepted
    draft the bonus token ~ p1; the draft's token 3 (p0 = 0) is never emitted."""
    n = 50_000
    count, emitted, drafts, uniforms = run_rule(n, 0)
    first = np.bincount(emitted[:, 0], minlength=4)
    assert first[3] == 0
    assert chi_square_p_value(first, P[0]) > 1e-4
    accept = np.minimum(P[0], Q[0]).sum()  # 0.6
    assert abs(count.mean() - accept) < 5 * np.sqrt(accept * (1 - accept) / n)
    bonus = np.bincount(emitted[count == 1, 1], minlength=4)
    assert chi_square_p_value(bonus, P[1]) > 1e-4
    # The residual max(0, p - q) is what makes this exact: correcting from p instead fails.
    rng = np.random.default_rng(0)
    kept = uniforms[:, 0] * Q[0][drafts[:, 0]] < P[0][drafts[:, 0]]
    wrong = np.where(kept, drafts[:, 0], rng.choice(4, size=n, p=P[0] / P[0].sum()))
    assert chi_square_p_value(np.bincount(wrong, minlength=4), P[0]) < 1e-12


def test_rule_is_greedy_for_greedy_lanes():
    p = jnp.asarray([[[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6]]] * 3)  # argmax 1, 0, 2
    q = jnp.ones((3, 2, 3)) / 3
    drafts = jnp.asarray([[1, 0], [1, 2], [0, 0]], jnp.int32)
    count, emitted = jax.jit(accept_reject)(p, q, drafts, jnp.zeros((3, 2)), jax.random.split(jax.random.PRNGKey(0), 3),
                                   jnp.ones(3, bool))
    assert count.tolist() == [2, 1, 0]
    assert emitted[0].tolist() == [1, 0, 2] and emitted[1, :2].tolist() == [1, 0] and emitted[2, 0] == 1


# -- sampling: the whole decoder against exact enumeration ------------------------------------

TINY_T = TransformerConfig(vocab_size=3, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=32, scan_layers=False)
TINY_D = dataclasses.replace(TINY_T, dim=8, n_heads=1, n_kv_heads=1, mlp_hidden=16)


def exact_sequence_probs(model, params, prompt, n_new, temperature):
    """Probability of each of the V**n_new continuations (lexicographic order), from one full
    forward pass over all of them: no cache, no speculation."""
    V = model.cfg.vocab_size
    continuations = np.asarray(list(itertools.product(range(V), repeat=n_new)), np.int32)
    tokens = np.concatenate([np.tile(prompt, (len(continuations), 1)), continuations], axis=1)
    logits = jax.jit(model.apply)({"params": params}, tokens)[:, len(prompt) - 1: -1]
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    picked = jnp.take_along_axis(logp, continuations[..., None], axis=-1)[..., 0]
    return np.exp(np.asarray(jnp.sum(picked, axis=1), np.float64))


@pytest.mark.slow  # 17-20 s on two cores: in the slow run, which CI runs too
def test_sampled_sequences_follow_the_target_distribution_exactly():
    """3-token vocabulary, 4 new tokens (the first from prefill, then steps of k=2 drafts
    plus a correction or bonus, cut at 4): 81 outcomes, 8,192 sampled sequences in 2,048
    lanes of distinct seeds. A chi-square test against the target's exact distribution; the
    draft's own distribution, what a rule that trusted the draft would give, fails it."""
    (tm, tp), (dm, dp) = random_model(TINY_T, 2, 4.0), random_model(TINY_D, 3, 4.0)
    prompt, n_new, temperature, lanes = [1, 2], 4, 1.0, 2048
    exact = exact_sequence_probs(tm, tp, prompt, n_new, temperature)
    draft_alone = exact_sequence_probs(dm, dp, prompt, n_new, temperature)
    decoder = SpeculativeDecoder(tm, dm, lanes, 8, k=2, rounds=2)
    V = TINY_T.vocab_size
    counts, accepted = np.zeros(V**n_new), []
    for call in range(4):
        requests = LaneRequests(
            keys=np.stack([request_key(call * lanes + i) for i in range(lanes)]), max_new=np.full(lanes, n_new, np.int32),
            sampling=SamplingParams.for_lanes(lanes, temperature=temperature),
        )
        out, stats = run_speculative(decoder, tp, dp, [prompt] * lanes, requests)
        accepted.append(stats.acceptance_rate)
        index = np.asarray(out) @ (V ** np.arange(n_new - 1, -1, -1))
        counts += np.bincount(index, minlength=V**n_new)
    assert 0.1 < np.mean(accepted) < 0.9  # both acceptances and rejections were exercised
    assert chi_square_p_value(counts, exact) > 1e-4
    assert 0.5 * np.abs(exact - draft_alone).sum() > 0.1
    assert chi_square_p_value(counts, draft_alone) < 1e-12


# --- speculative decoding in the lane engine, with tool calls ----------------------------------


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_speculative_lanes_with_tool_calls_give_the_target_alones_dialogs(model_and_params):
    """A weaker random draft proposes, the engine's target (made to call tools often) verifies:
    greedy dialogs with tool replies injected mid-generation equal the naive target-only ones."""
    import flax.linen as nn

    from lmjax.generate.engine import LaneEngine, Request

    model, params = model_and_params
    draft = Transformer(TransformerConfig(vocab_size=model.cfg.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=32))
    draft_params = nn.meta.unbox(jax.jit(draft.init)(jax.random.PRNGKey(5), jnp.zeros((1, 8), jnp.int32))["params"])
    prompts = [TOK.encode(t) for t in ("Hi", "When was Ada born?", "Tell me", "ok then!")]

    def tool(query):
        time.sleep(0.01 * (len(query) % 3))
        return f"r{len(query) % 5}"

    lanes = SpeculativeLanes(SpeculativeDecoder(model, draft, 2, PAD_TO, k=3, stop_ids=FMT.stop_ids, rounds=2))
    engine = LaneEngine(lanes, (params, draft_params), TOK, tool=tool)
    completions = engine.generate([Request(p, max_new_tokens=14, id=i) for i, p in enumerate(prompts)])
    assert sum(len(c.tool_calls) for c in completions) >= 2
    for prompt, completion in zip(prompts, completions):
        assert completion.tokens == naive_dialog(model, params, prompt, tool, 14)
