"""Mamba and RNN models in the decoder and the lane engine: a constant-size state per lane
(conv window + recurrent state) instead of a KV cache, against re-running the full forward."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.data.tokenizers.byte import ByteTokenizer
from lmjax.dialog import format_for
from lmjax.generate.decoder import Decoder, LaneRequests
from lmjax.generate.engine import LaneEngine, Request
from lmjax.models.mamba import Mamba, MambaConfig
from lmjax.models.rnn import RNN, RNNConfig

TOK = ByteTokenizer()
V = TOK.vocab_size
# fan_in init: weights large enough that the recurrence, not the output bias of a near-zero
# network, decides the argmax (at std 0.02 every position predicts nearly the same token).
FAMILIES = {
    "mamba": lambda: Mamba(MambaConfig(vocab_size=V, dim=32, n_layers=2, d_state=8, init="fan_in", chunk_size=8)),
    "mamba-sequential": lambda: Mamba(MambaConfig(vocab_size=V, dim=32, n_layers=2, d_state=8, init="fan_in",
                                                  scan="sequential", scan_layers=False)),
    "hawk": lambda: RNN(RNNConfig(vocab_size=V, dim=32, n_layers=2, cell="hawk", init="fan_in")),
    "mingru": lambda: RNN(RNNConfig(vocab_size=V, dim=32, n_layers=2, cell="mingru", init="fan_in")),
    "minlstm": lambda: RNN(RNNConfig(vocab_size=V, dim=32, n_layers=2, cell="minlstm", init="fan_in", d_conv=0)),
}
PAD_TO = 96


# In the default run: minLSTM (no conv window: a state of another shape).
# Mamba (chunked and sequential), Hawk and minGRU (Hawk's state, another cell) are in the slow run (~20-27 s each).
SLOW_FAMILIES = ("mamba-sequential", "mingru", "hawk", "mamba")


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=pytest.mark.slow if name in SLOW_FAMILIES else ()) for name in FAMILIES
])
def model_and_params(request):
    model = FAMILIES[request.param]()
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))["params"])  # jitted: op by op is slower
    forward = jax.jit(lambda params, tokens_1xL, length: model.apply({"params": params}, tokens_1xL)[0, length - 1])
    return model, params, forward


def greedy_next(forward, params, seq):
    """Full forward over the whole sequence (causal: the zero padding after it cannot matter)."""
    padded = np.zeros((1, PAD_TO), np.int32)
    padded[0, : len(seq)] = seq
    return int(jnp.argmax(forward(params, padded, len(seq))))


def decode_all(decoder, params, prompts, n_new, state=None):
    requests = LaneRequests.empty(decoder.lanes).replace(max_new=np.full(decoder.lanes, n_new, np.int32))
    chunks = list(prompts) + [[]] * (decoder.lanes - len(prompts))
    state = decoder.init_state() if state is None else state
    state, first = decoder.prefill(params, state, chunks, np.zeros(decoder.lanes, np.int32), requests,
                                   reset=[bool(c) for c in chunks])
    out = [[int(first[b])] for b in range(len(prompts))]
    while np.asarray(state.active).any():
        state, tokens, counts = decoder.decode(params, state, requests)
        for b in range(len(prompts)):
            out[b] += tokens[b, : counts[b]].tolist()
    return out, state


def test_decoding_with_the_recurrent_state_equals_the_full_forward(model_and_params):
    model, params, forward = model_and_params
    decoder = Decoder(model, lanes=4, max_len=PAD_TO, chunk=5)
    first = [[1, 2, 3, 4, 5], [7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]]
    got, state = decode_all(decoder, params, first, n_new=12)
    # The same lanes again, without clearing anything: a prompt written at position 0 starts
    # its lane's state afresh.
    second = [[40, 41], [50, 51, 52, 53, 54, 55, 56, 57, 58], [60, 61, 62]]
    got_again, _ = decode_all(decoder, params, second, n_new=12, state=state)
    for prompt, tokens in zip(first + second, got + got_again):
        expected = []
        for _ in range(12):
            expected.append(greedy_next(forward, params, prompt + expected))
        assert tokens == expected
    assert len({t for tokens in got + got_again for t in tokens}) > 3  # not a constant output
    assert set(decoder.compilations.values()) == {1}


def test_the_state_per_lane_does_not_grow_with_the_cache_length(model_and_params):
    model, _, _ = model_and_params
    short, long = (Decoder(model, lanes=2, max_len=n).init_state().cache for n in (16, 4096))
    assert jax.tree_util.tree_map(lambda x: x.shape, short) == jax.tree_util.tree_map(lambda x: x.shape, long)


FMT = format_for(TOK)
# The byte-level dialog: `<|database|>` calls the tool, `<|assistant|>` opens an assistant turn.
CALL, TURN = FMT.call_id, TOK.special_id("assistant")


def naive_dialog(forward, params, prompt, tool, max_new):
    seq, n_new = list(prompt), 0
    while n_new < max_new:
        token = greedy_next(forward, params, seq)
        seq.append(token)
        n_new += 1
        if token == CALL and n_new < max_new:
            turn = len(seq) - 1 - seq[:-1][::-1].index(TURN) if TURN in seq[:-1] else 0
            seq += TOK.encode(tool(TOK.decode(seq[turn:-1]))) + [TURN]
        elif token in FMT.stop_ids:
            break
    return seq[len(prompt):]


def test_tool_replies_injected_into_recurrent_lanes_match_the_naive_dialog(model_and_params):
    model, params, forward = model_and_params
    params = jax.tree_util.tree_map(lambda x: x, params)
    head = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = head.at[:, CALL].add(2.0 * jnp.abs(head).mean() * jnp.sign(head[:, CALL]))  # call often
    prompts = [TOK.encode(text) for text in ("Hi", "When was Ada born?", "x" * 30, "Where?", "Tell me", "ok then!")]

    def tool(query):
        return f"r{len(query) % 7}"

    decoder = Decoder(model, 3, PAD_TO, stop_ids=FMT.stop_ids, chunk=3)
    engine = LaneEngine(decoder, params, TOK, tool=tool)
    completions = engine.generate([Request(p, max_new_tokens=14, id=i) for i, p in enumerate(prompts)])
    assert sum(len(c.tool_calls) for c in completions) >= 2, [c.tokens for c in completions]
    for prompt, completion in zip(prompts, completions):
        assert completion.tokens == naive_dialog(forward, params, prompt, tool, 14)


def test_cache_spec_describes_the_state_the_model_returns(model_and_params):
    """`model.cache_spec` (what the decoder allocates and shards) has the structure, shapes and
    dtypes of the state a chunk of decoding returns."""
    from lmjax.generate.cache import init_cache, is_leaf

    model, params, _ = model_and_params
    spec = model.cache_spec(3, 16)
    tokens = jnp.ones((3, 4), jnp.int32)
    _, cache = jax.jit(model.apply)({"params": params}, tokens, jnp.broadcast_to(jnp.arange(4), (3, 4)),
                                    jnp.ones((3, 4), jnp.int32), cache=init_cache(model, 3, 16))
    described = jax.tree_util.tree_map(lambda leaf: (leaf.shape, jnp.dtype(leaf.dtype)), spec, is_leaf=is_leaf)
    returned = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), cache)
    assert type(cache) is type(spec) and described == returned
