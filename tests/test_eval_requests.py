"""lmjax/eval/evaluator.py: each request kind equals a brute-force computation, one request at a
time, with the full forward pass of the unpacked sequence."""
import jax
import numpy as np
import pytest

from lmjax.data.tokenizers.byte import ByteTokenizer
from lmjax.eval.evaluator import RequestEvaluator, pack, rolling_pieces
from lmjax.eval.requests import GenerateUntil, Loglikelihood, Rolling, cut_at_stop
from lmjax.generate.api import Generator
from lmjax.models.transformer import Transformer, TransformerConfig

SEQ_LEN = 24


@pytest.fixture(scope="module")
def model_and_params():
    model = Transformer(TransformerConfig(vocab_size=260, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden=64))
    params = model.init(jax.random.PRNGKey(3), np.zeros((1, 8), np.int32))["params"]
    return model, params


_forwards = {}


def log_probs_of(model, params, tokens):
    """log p(tokens[i+1] | tokens[:i+1]) and argmax hits, float64, one unpacked row (padded at
    the end to one length, so that it compiles once: causal, padding never changes a token)."""
    if id(params) not in _forwards:
        _forwards[id(params)] = jax.jit(lambda row: model.apply({"params": params}, row))
    row = np.zeros((1, 2 * SEQ_LEN), np.int32)
    row[0, : len(tokens) - 1] = tokens[:-1]
    logits = np.asarray(_forwards[id(params)](row)[0, : len(tokens) - 1], np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets = np.asarray(tokens[1:])
    return log_probs[np.arange(len(targets)), targets], np.argmax(logits, -1) == targets


def brute_loglikelihood(model, params, context, continuation, seq_len):
    tokens = (list(context) + list(continuation))[-(seq_len + 1):]
    lp, hit = log_probs_of(model, params, tokens)
    n = len(continuation)
    return lp[-n:].sum(), int(hit[-n:].sum()), n


def brute_rolling(model, params, tokens, prefix, seq_len):
    """Each token scored alone, given the tokens of its window before it (windows of the
    definition: targets 1..seq_len, seq_len+1..2*seq_len, ...; each row as full as it can be)."""
    seq = ([prefix] if prefix is not None else []) + list(tokens)
    total, hits = 0.0, 0
    for j in range(1, len(seq)):
        window_stop = min(len(seq), 1 + ((j - 1) // seq_len + 1) * seq_len)
        start = max(0, window_stop - 1 - seq_len)
        lp, hit = log_probs_of(model, params, seq[start: j + 1])
        total, hits = total + lp[-1], hits + int(hit[-1])
    return total, hits, len(seq) - 1


def random_ids(rng, n):
    return [int(t) for t in rng.integers(3, 256, n)]


def test_loglikelihood_requests_equal_one_at_a_time_forward_passes(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(0)
    # Short ones pack several to a row; the last has a context longer than the window (cut from the left).
    requests = [Loglikelihood(random_ids(rng, c), random_ids(rng, k)) for c, k in [(1, 1), (5, 3), (9, 7), (3, 12), (2, 2), (30, 4)]]
    scores = RequestEvaluator(model, params, ByteTokenizer(), seq_len=SEQ_LEN, rows=2).answer(requests)
    for request, score in zip(requests, scores):
        logprob, hits, n = brute_loglikelihood(model, params, request.context, request.continuation, SEQ_LEN)
        assert score.tokens == n and score.greedy_tokens == hits
        assert score.logprob == pytest.approx(logprob, abs=2e-5)
        assert score.greedy == (hits == n)


def test_packing_puts_several_requests_in_one_row(model_and_params):
    rng = np.random.default_rng(1)
    from lmjax.eval.evaluator import loglikelihood_piece

    pieces = [loglikelihood_piece(i, Loglikelihood(random_ids(rng, 3), random_ids(rng, 2)), SEQ_LEN) for i in range(12)]
    rows = pack(pieces, SEQ_LEN)
    assert len(rows) == 2  # 5 tokens, 4 inputs each: 6 to a row of 24
    assert sorted(p.request for row in rows for p in row) == list(range(12))


@pytest.mark.parametrize("n_tokens,prefix", [(10, None), (SEQ_LEN + 1, 1), (2 * SEQ_LEN + 5, None)])
def test_rolling_requests_equal_token_by_token_forward_passes(model_and_params, n_tokens, prefix):
    model, params = model_and_params
    tokens = random_ids(np.random.default_rng(n_tokens), n_tokens)
    score, = RequestEvaluator(model, params, ByteTokenizer(), seq_len=SEQ_LEN, rows=2).answer([Rolling(tokens, prefix)])
    logprob, hits, n = brute_rolling(model, params, tokens, prefix, SEQ_LEN)
    assert (score.tokens, score.greedy_tokens) == (n, hits)
    assert score.logprob == pytest.approx(logprob, abs=5e-5)


def test_rolling_windows_predict_every_token_once_with_full_rows():
    tokens = list(range(3, 3 + 2 * SEQ_LEN + 5))
    pieces = rolling_pieces(0, Rolling(tokens, prefix=1), SEQ_LEN)
    predicted = [t for p in pieces for t in p.tokens[1:][p.scored_from:]]
    assert predicted == tokens
    assert all(len(p.tokens) - 1 == SEQ_LEN for p in pieces)  # the last window backfills its context


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_generate_until_is_greedy_generation_cut_at_the_stop_string(model_and_params):
    model, params = model_and_params
    tokenizer = ByteTokenizer()
    contexts = [tokenizer.encode(text) for text in ("The cat", "A b c d e f", "zz")]
    evaluator = RequestEvaluator(model, params, tokenizer, seq_len=64, lanes=2, chunk=4)
    reference = Generator(model, params, tokenizer, lanes=1, max_len=64, chunk=4)
    for context in contexts:
        full = reference.generate([context], max_new_tokens=12)[0]
        stop = full.text[3:5] if len(full.text) >= 5 else "\x00"
        generated, = evaluator.answer([GenerateUntil(context, until=(stop,), max_new_tokens=12)])
        assert generated.tokens == full.tokens
        assert generated.text == cut_at_stop(full.text, (stop,))[0]
        assert len(generated.text) <= 3 or stop not in full.text[:3]


def test_mixed_requests_come_back_in_order(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(5)
    requests = [Rolling(random_ids(rng, 9)), GenerateUntil(random_ids(rng, 4), max_new_tokens=3), Loglikelihood([5], [6, 7])]
    answers = RequestEvaluator(model, params, ByteTokenizer(), seq_len=SEQ_LEN, lanes=2, chunk=4, gen_len=32).answer(requests)
    assert [type(a).__name__ for a in answers] == ["Score", "Generated", "Score"]
    assert answers[2].tokens == 2 and answers[0].tokens == 8


def test_bad_requests_are_one_line_errors():
    with pytest.raises(ValueError, match="continuation"):
        Loglikelihood([1], [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerateUntil([1], max_new_tokens=0)
    with pytest.raises(ValueError, match="token to score"):
        Rolling([4])
    assert cut_at_stop("abc\n\ndef", ("\n\n", "c")) == ("ab", True)
    assert cut_at_stop("abc", ()) == ("abc", False)
