"""The lane engine: continuous batching and tool replies injected into the cache."""
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.data.tokenizers.byte import ByteTokenizer
from lmjax.dialog import format_for
from lmjax.generate.decoder import Decoder
from lmjax.generate.engine import LaneEngine, Request, ToolRunner
from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.tools.facts_db import ToolError

TOK = ByteTokenizer()
CFG = TransformerConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64)


FMT = format_for(TOK)
# The byte-level dialog: `<|database|>` calls the tool, `<|assistant|>` opens an assistant turn.
CALL, TURN = FMT.call_id, TOK.special_id("assistant")


@pytest.fixture(scope="module")
def model_and_params():
    """A random model made to emit CALL often (its output column scaled up), so lanes call tools."""
    model = Transformer(CFG)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])  # jitted: op by op is slower
    kernel = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = kernel.at[:, CALL].set(kernel[:, CALL] * 4.0)
    return model, params


PAD_TO = 96


@jax.jit
def _last_logits(params, tokens_1xL, length):
    # Causal: the padding after `length` cannot change the logits before it; one shape, one compile.
    return Transformer(CFG).apply({"params": params}, tokens_1xL)[0, length - 1]


def greedy_next(model, params, seq):
    padded = np.zeros((1, PAD_TO), np.int32)
    padded[0, : len(seq)] = seq
    return int(jnp.argmax(_last_logits(params, padded, len(seq))))


def naive_dialog(model, params, prompt, tool, max_new):
    """The engine's behaviour without cache, lanes or threads: full forward for every token,
    the tool's reply and an assistant header appended after each call token."""
    seq, n_new = list(prompt), 0
    while n_new < max_new:
        token = greedy_next(model, params, seq)
        seq.append(token)
        n_new += 1
        if token == CALL and n_new < max_new:
            turn = len(seq) - 1 - seq[:-1][::-1].index(TURN) if TURN in seq[:-1] else 0
            seq += TOK.encode(tool(TOK.decode(seq[turn:-1]))) + [TURN]
        elif token in FMT.stop_ids:
            break
    return seq[len(prompt):]


def make_engine(model, params, tool, *, lanes, timeout=5.0, chunk=3):
    decoder = Decoder(model, lanes, PAD_TO, stop_ids=FMT.stop_ids, chunk=chunk)
    return LaneEngine(decoder, params, TOK, tool=tool, tool_timeout_s=timeout)


def test_tool_replies_injected_in_several_lanes_match_the_naive_dialog(model_and_params):
    model, params = model_and_params
    prompts = [TOK.encode(text) for text in ("Hi", "When was Ada born?", "x" * 30, "Where?", "Tell me", "ok then!")]

    def tool(query):
        time.sleep(0.01 * (len(query) % 4))  # lanes get their replies at different chunks
        return f"r{len(query) % 7}"

    engine = make_engine(model, params, tool, lanes=3)
    completions = engine.generate([Request(p, max_new_tokens=14, id=i) for i, p in enumerate(prompts)])
    assert [c.id for c in completions] == list(range(len(prompts)))
    assert sum(len(c.tool_calls) for c in completions) >= 3, [len(c.tool_calls) for c in completions]
    assert len({len(c.prompt) for c in completions if c.tool_calls}) >= 2  # calls at different positions
    for prompt, completion in zip(prompts, completions):
        assert completion.tokens == naive_dialog(model, params, prompt, tool, 14)


def test_tool_failures_become_error_replies_and_never_stall_other_lanes(model_and_params):
    model, params = model_and_params
    prompts = [TOK.encode(text) for text in ("a", "bb", "ccc", "dddd")]
    never = threading.Event()
    calls = []

    def tool(query):
        calls.append(query)
        kind = len(calls) % 3
        if kind == 1:
            never.wait()  # hangs until the test ends
        if kind == 2:
            raise ToolError("Unknown person 'Nobody'.")
        raise RuntimeError("disk on fire")

    engine = make_engine(model, params, tool, lanes=2, timeout=0.2)
    try:
        completions = engine.generate([Request(p, max_new_tokens=10) for p in prompts])
    finally:
        never.set()
    replies = [call["reply"] for c in completions for call in c.tool_calls]
    assert any(r == "error: the tool timed out after 0.2 s" for r in replies)
    assert "error: Unknown person 'Nobody'." in replies
    assert "error: the tool failed (RuntimeError: disk on fire)" in replies
    assert all(not call["ok"] for c in completions for call in c.tool_calls)
    assert all(c.finish_reason in ("stop", "length", "cache_full") for c in completions)


def test_a_call_without_a_tool_ends_the_lane(model_and_params):
    model, params = model_and_params
    engine = make_engine(model, params, None, lanes=1)
    (completion,) = engine.generate([Request(TOK.encode("Hi"), max_new_tokens=20)])
    assert completion.finish_reason == "tool_call" and completion.tokens[-1] == CALL


def test_facts_database_errors_are_one_line_replies(tmp_path):
    from lmjax.data.facts import generate_facts
    from lmjax.tools import TOOLS

    folder = generate_facts(tmp_path, num_people=4, seed=0, num_unseen=1)
    runner = ToolRunner(TOOLS.get("facts")(folder), timeout_s=1.0)
    for query, expected in (
        ("FIND birth_date", "error: Malformed query"),
        ("```sql\nFIND birth_date FOR Nobody Atall\n```", "error: Unknown person 'Nobody Atall'."),
        ("```sql\nFIND shoe_size FOR Nobody Atall\n```", "error: Unknown attribute 'shoe_size'"),
    ):
        future, _ = runner.start(query)
        future.result(timeout=5)
        reply, ok = runner.reply(future)
        assert reply.startswith(expected) and not ok and "\n" not in reply


@pytest.mark.parametrize("seconds", [0, -1.0, float("nan"), float("inf"), "soon"])
def test_bad_tool_timeouts_are_clear_errors(model_and_params, seconds):
    model, params = model_and_params
    with pytest.raises(ValueError, match="tool_timeout_s must be a positive, finite number of seconds"):
        make_engine(model, params, lambda query: "r", lanes=1, timeout=seconds)
    with pytest.raises(ValueError, match="tool_timeout_s must be a positive"):
        ToolRunner(lambda query: "r", seconds)


@pytest.mark.parametrize("prompt, message", [
    ([], "is empty"),
    ([1] * 97, "has 97 tokens but the cache holds 96"),
    ([1, 999], "token id 999 outside the model's vocabulary"),
])
def test_bad_prompts_are_clear_errors(model_and_params, prompt, message):
    model, params = model_and_params
    engine = LaneEngine(Decoder(model, 2, 96, stop_ids=FMT.stop_ids), params, TOK)
    with pytest.raises(ValueError, match=message):
        engine.generate([Request([5, 6]), Request(prompt)])


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_sampled_completions_depend_on_the_seed_not_on_lanes_or_chunks(model_and_params):
    model, params = model_and_params
    stops = FMT.stop_ids
    requests = [Request(TOK.encode(t), max_new_tokens=12, temperature=1.0, top_p=0.9, seed=s) for s, t in enumerate("abcde")]
    one = LaneEngine(Decoder(model, 1, 64, stop_ids=stops, chunk=5), params, TOK).generate(requests)
    many = LaneEngine(Decoder(model, 4, 64, stop_ids=stops, chunk=2), params, TOK).generate(requests)
    assert [c.tokens for c in one] == [c.tokens for c in many]
    assert len({tuple(c.tokens) for c in one}) > 1
