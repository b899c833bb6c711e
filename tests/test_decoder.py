"""KV-cache decoding against the full forward pass without a cache."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.generate.cache import init_cache
from lmjax.generate.decoder import Decoder, LaneRequests
from lmjax.models.kv_cache import KVCache
from lmjax.models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64)


@functools.cache  # tests share a model and its parameters (never changed): ~5 s of init each on 2 cores
def random_model(cfg=CFG, seed=0):
    model = Transformer(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


@functools.cache
def full_forward_last_logits(model):
    """The model's forward without a cache, jitted once per model (equal configs share it)."""

    @jax.jit
    def last_logits(params, tokens_1xL, prompt_1xL, length):
        return model.apply({"params": params}, tokens_1xL, None, None, prompt_1xL)[0, length - 1]

    return last_logits


def naive_greedy(model, params, prompt, n_new, prefix_lm=False, pad_to=128):
    """Re-run the whole sequence for every new token and take the argmax: no cache at all.
    Sequences are padded to one length so the forward compiles once; the padding comes after
    every real token, so under a causal (or prefix-LM) mask it cannot change their logits."""
    last_logits = full_forward_last_logits(model)
    seq = list(prompt)
    flags = np.zeros((1, pad_to), bool)
    flags[0, : len(prompt)] = prefix_lm
    for _ in range(n_new):
        padded = np.zeros((1, pad_to), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(jnp.argmax(last_logits(params, padded, flags, len(seq)))))
    return seq[len(prompt):]


def decode_all(decoder, params, prompts, n_new):
    requests = LaneRequests.empty(decoder.lanes).replace(max_new=np.full(decoder.lanes, n_new, np.int32))
    state = decoder.init_state()
    chunks = list(prompts) + [[]] * (decoder.lanes - len(prompts))
    state, first = decoder.prefill(params, state, chunks, np.zeros(decoder.lanes, np.int32), requests,
                                   prompt=[bool(c) for c in chunks], reset=[True] * decoder.lanes)
    out = [[int(first[b])] for b in range(len(prompts))]
    while np.asarray(state.active).any():
        state, tokens, counts = decoder.decode(params, state, requests)
        for b in range(len(prompts)):
            out[b] += tokens[b, : counts[b]].tolist()
    return out


@pytest.mark.parametrize("scan_layers", [pytest.param(True, marks=pytest.mark.slow), False])  # scanned: 30 s, in the slow run
def test_cached_logits_equal_full_forward(scan_layers):
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    model, params = random_model(cfg)
    B, L, S, P = 3, 20, 32, 7
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, L), 0, cfg.vocab_size)
    # Jitted: op by op, each call below took ~4 s on 2 cores.
    full = jax.jit(model.apply)({"params": params}, tokens)
    cache = init_cache(model, B, S)
    ones = jnp.ones((B, P), jnp.int32)
    logits, cache = jax.jit(model.apply)({"params": params}, tokens[:, :P], jnp.broadcast_to(jnp.arange(P), (B, P)), ones, cache=cache)
    assert isinstance(cache, KVCache) and cache.k.shape == (cfg.n_layers, B, S, cfg.n_kv_heads, cfg.dim // cfg.n_heads)
    assert cache.k.dtype == jnp.float32 and init_cache(model, B, S, jnp.bfloat16).v.dtype == jnp.bfloat16
    # f32 throughout; differences come only from summation order over masked slots.
    np.testing.assert_allclose(logits, full[:, :P], atol=1e-5)

    @jax.jit
    def one_token(token_Bx1, t, cache):
        return model.apply({"params": params}, token_Bx1, jnp.full((B, 1), t), jnp.ones((B, 1), jnp.int32),
                           cache=cache, logits_at_B=jnp.zeros(B, jnp.int32))

    for t in range(P, L):
        step_logits, cache = one_token(tokens[:, t : t + 1], t, cache)
        np.testing.assert_allclose(step_logits, full[:, t], atol=1e-5)


def test_greedy_decoding_equals_rerunning_the_full_forward_for_prompts_of_different_lengths():
    model, params = random_model()
    prompts = [[1, 2, 3, 4, 5], [7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]]
    decoder = Decoder(model, lanes=4, max_len=64, chunk=5)
    got = decode_all(decoder, params, prompts, n_new=12)
    for prompt, tokens in zip(prompts, got):
        assert tokens == naive_greedy(model, params, prompt, 12)


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_prefix_lm_generation_matches_the_training_mask():
    cfg = dataclasses.replace(CFG, prefix_lm=True)
    model, params = random_model(cfg, seed=4)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]
    got = decode_all(Decoder(model, lanes=2, max_len=32, chunk=4), params, prompts, n_new=8)
    for prompt, tokens in zip(prompts, got):
        assert tokens == naive_greedy(model, params, prompt, 8, prefix_lm=True)
    # The cache path sees the prompt both ways, like the full forward with prompt flags, and
    # unlike a causal model (whose argmax a random model rarely changes, hence logits here).
    prompt = jnp.asarray([prompts[0]])
    P = prompt.shape[1]
    flags = jnp.ones((1, P), bool)
    full = jax.jit(model.apply)({"params": params}, prompt, None, None, flags)  # jitted: ~4 s a call op by op
    cached, _ = jax.jit(model.apply)(
        {"params": params}, prompt, jnp.arange(P)[None], jnp.ones((1, P), jnp.int32), flags, cache=init_cache(model, 1, 16)
    )
    np.testing.assert_allclose(cached, full, atol=1e-5)
    causal = jax.jit(Transformer(dataclasses.replace(cfg, prefix_lm=False)).apply)({"params": params}, prompt)
    assert np.abs(np.asarray(causal - full))[0, :-1].max() > 1e-4


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_each_shape_compiles_once_over_many_prompts():
    model, params = random_model()
    decoder = Decoder(model, lanes=3, max_len=64, chunk=4)
    rng = np.random.default_rng(0)
    for _ in range(6):
        prompts = [rng.integers(0, CFG.vocab_size, rng.integers(1, 40)).tolist() for _ in range(3)]
        decode_all(decoder, params, prompts, n_new=int(rng.integers(1, 9)))
    assert set(decoder.compilations.values()) == {1}
    assert {key for key, _ in decoder.compilations} == {"prefill", "decode"}
    assert {key for kind, key in decoder.compilations if kind == "prefill"} <= {(decoder.lanes, size) for size in decoder.buckets}


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_stops_at_stop_tokens_max_new_and_a_full_cache():
    model, params = random_model()
    prompt = [5, 6, 7]
    free = naive_greedy(model, params, prompt, 10)
    stop = free[3]
    got = decode_all(Decoder(model, lanes=1, max_len=64, stop_ids=(stop,)), params, [prompt], n_new=10)[0]
    assert got == free[: free.index(stop) + 1]
    assert decode_all(Decoder(model, lanes=1, max_len=64), params, [prompt], n_new=4)[0] == free[:4]
    # 8 slots: the prompt fills 3, so 5 tokens can be fed back and the 6th is the last sampled.
    assert decode_all(Decoder(model, lanes=1, max_len=8), params, [prompt], n_new=10)[0] == free[:6]


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_decoding_a_trained_model_equals_the_full_forward(tmp_path):
    from conftest import tiny_facts_config

    from lmjax.data.tokenizers.byte import ByteTokenizer
    from lmjax.generate.load import load_run
    from lmjax.train.loop import train

    # The model is what matters here: no FLOP count, TensorBoard or evaluation along the way.
    config = tiny_facts_config(**{"train.steps": 40, "train.eval_every": 40, "logging.count_flops": False,
                                  "logging.tensorboard": False})
    train(config, tmp_path)
    _, model, params, task = load_run(tmp_path)
    tok = ByteTokenizer()
    prompts = [[tok.special_id("user"), *tok.encode(q), tok.special_id("assistant")] for q in ("When was Ada born?", "Who?")]
    got = decode_all(Decoder(model, lanes=2, max_len=96, chunk=8), params, prompts, n_new=20)
    for prompt, tokens in zip(prompts, got):
        assert tokens == naive_greedy(model, params, prompt, 20)


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
@pytest.mark.parametrize("page_size", [0, 16])
def test_warm_up_compiles_every_shape_so_generation_never_compiles_again(page_size):
    """Paged, a prefill call may also take one row (lanes with a chunk padded to a power of 4)."""
    model, params = random_model()
    decoder = Decoder(model, lanes=2, max_len=48, chunk=4, page_size=page_size)
    decoder.warm_up(params)
    before = dict(decoder.compilations)
    rows = [1, 2] if page_size else [2]
    assert decoder.buckets == [16, 32, 48] and decoder.row_counts == rows
    assert {key for kind, key in before if kind == "prefill"} == {(r, size) for r in rows for size in decoder.buckets}
    decode_all(decoder, params, [[1] * 40, [1] * 36 + [2, 3]], n_new=5)  # paged: lane 1 shares 2 pages, one row
    state = decoder.init_state()  # one new dialog in one lane: one row when paged
    decoder.prefill(params, state, [[4, 5], []], np.zeros(2, np.int32), LaneRequests.empty(2), reset=[True, False])
    assert dict(decoder.compilations) == before


def test_request_key_is_jax_random_key_of_the_seed():
    from lmjax.generate.decoder import request_key

    for seed in (0, 7, 2**31 + 5, 2**40 + 3):
        np.testing.assert_array_equal(request_key(seed), jax.random.key_data(jax.random.key(seed)))


def test_sampling_stays_inside_a_smaller_tokenizer_vocabulary():
    model, params = random_model()
    prompt = [5, 6, 7]
    got = decode_all(Decoder(model, lanes=1, max_len=32, sample_vocab=10), params, [prompt], n_new=8)[0]
    assert all(t < 10 for t in got)
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray([prompt]))[0, -1]
    assert got[0] == int(jnp.argmax(logits[:10]))


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_decode_attends_over_the_filled_extent_of_a_long_cache_with_the_same_tokens():
    """A cache of 300 slots: decode attends over the first 128, then 256, then all 300 as lanes
    advance (one compile each), and gives the tokens of a cache-free forward."""
    model, params = random_model()
    decoder = Decoder(model, lanes=2, max_len=300, chunk=16)
    assert decoder.extents == [128, 256, 300]
    prompts = [[3, 1, 4, 1, 5], list(range(1, 51)) * 2]  # the second lane starts at slot 100, ends past 256
    got = decode_all(decoder, params, prompts, n_new=150)
    for prompt, tokens in zip(prompts, got):
        assert tokens == naive_greedy(model, params, prompt, len(tokens), pad_to=320)
    assert len(got[1]) == 150
    assert {extent for kind, key in decoder.compilations if kind == "decode" for extent in [key[1]]} == {128, 256, 300}
    full = decode_all(Decoder(model, lanes=2, max_len=300, chunk=16, attend_filled=False), params, prompts, n_new=150)
    assert full == got
