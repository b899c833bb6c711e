"""A real tool call end to end: a tiny transformer overfit on the in-tool (qatool) dialogs of two
people writes the query itself, the lane engine runs it against the real SQLite database and
writes the reply back, the model answers from it, and `qa_recall` scores the answer.

`trained_tool_model` and `tool_generator` are shared with tests/test_recall.py: one training
(200 full-batch steps, a few seconds) and one compiled generator per test session.

A lookup that hangs inside SQLite (tests/test_facts_db.py's injected hang) costs only its own
question a time-out: the other lookups of the same engine, then and later, are answered."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from test_facts_db import first_sql_statement_hangs

from lmjax.data.facts import generate_facts, read_dialogs
from lmjax.data.tokenizers.byte import ByteTokenizer
from lmjax.dialog import answer_is_correct, encode_dialog, to_training_example, user_question
from lmjax.eval.recall import qa_recall
from lmjax.generate.api import Generator
from lmjax.generate.engine import LaneEngine, Request
from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.tools import TOOLS
from lmjax.tools.facts_db import FactsDatabase, parse_query

TOK = ByteTokenizer()
CFG = TransformerConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden=64, scan_layers=False)
PAD_TO = 144  # the longest of these dialogs has ~130 tokens


def padded_batch(records):
    examples = [to_training_example(encode_dialog(TOK, r["dialog"], answer=r["answer"])) for r in records]
    assert max(len(e["inputs"]) for e in examples) <= PAD_TO
    batch = {key: np.zeros((len(examples), PAD_TO), np.int32) for key in ("inputs", "targets", "loss_mask")}
    for row, example in enumerate(examples):
        for key in batch:
            batch[key][row, : len(example[key])] = example[key]
    return batch


def overfit(batch, steps=200, lr=1e-2):
    """Full-batch Adam on the loss-masked cross entropy: memorises a handful of dialogs."""
    model = Transformer(CFG)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    optimizer = optax.adam(lr)

    def loss_fn(params):
        logits = model.apply({"params": params}, batch["inputs"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return (losses * batch["loss_mask"]).sum() / batch["loss_mask"].sum()

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
    return model, params, float(loss)


@functools.lru_cache(maxsize=None)
def trained_tool_model(base_dir):
    """(model, params, facts folder, qatool records): a model that knows the two people's
    questions, queries and answers by heart. `base_dir`: the session's temporary folder."""
    folder = generate_facts(base_dir / "tool_model_facts", num_people=2, seed=0, num_unseen=0)
    records = read_dialogs(folder / "qatool.jsonl")
    model, params, loss = overfit(padded_batch(records))
    assert loss < 0.02, f"the tiny model did not memorise its 8 dialogs (loss {loss:.3f})"
    return model, params, folder, records


@functools.lru_cache(maxsize=None)
def tool_generator(base_dir):
    """A `Generator` of the trained model with the real facts tool attached to its database."""
    model, params, folder, _ = trained_tool_model(base_dir)
    return Generator(model, params, TOK, lanes=8, max_len=192, chunk=16, tool=TOOLS.get("facts")(folder))


def test_the_model_queries_the_real_database_and_answers_from_its_reply(tmp_path_factory):
    _, _, folder, records = trained_tool_model(tmp_path_factory.getbasetemp())
    generator = tool_generator(tmp_path_factory.getbasetemp())
    completions = generator.generate([user_question(r["dialog"]) for r in records], max_new_tokens=120)
    with FactsDatabase(folder / "people.db") as database:
        for record, completion in zip(records, completions):
            query, reply, answer = (turn["content"] for turn in record["dialog"][1:])
            (call,) = completion.tool_calls
            # The model wrote the query; the engine asked the real database and injected its value.
            assert call["query"] == query and call["ok"]
            attribute, name = parse_query(call["query"])
            assert attribute == record["attribute"] and name in record["dialog"][0]["content"]
            assert call["reply"] == database.lookup(name, attribute) == record["answer"] == reply
            assert completion.finish_reason == "stop"
            assert completion.text == f"{query}<|database|>{reply}<|assistant|>{answer}<|eod|>"

    accuracy, details = qa_recall(generator, records, max_new_tokens=120)
    assert accuracy == 1.0
    assert details == [
        {"people_id": r["people_id"], "attribute": r["attribute"], "expected": r["answer"],
         "answer": r["dialog"][-1]["content"], "correct": True, "correct_suffix": True, "tool_calls": 1}
        for r in records
    ]


HANG_TIMEOUT_S = 2.0  # the hung lookup's question waits this long; healthy lookups take microseconds


def test_a_hung_lookup_times_out_alone_and_later_lookups_in_the_engine_are_answered(tmp_path_factory, monkeypatch):
    """The first lookup hangs inside SQLite until the end of the test. Its question gets the
    time-out reply; the 7 other questions asked with it get their values, and so do all 8 asked
    again in the same engine while that lookup still hangs (one database, one engine)."""
    base = tmp_path_factory.getbasetemp()
    _, params, folder, records = trained_tool_model(base)
    generator = tool_generator(base)  # its compiled decoder; the engine below has its own database
    requests = [Request(generator.prompt_tokens(user_question(r["dialog"])), max_new_tokens=120) for r in records]
    assert len(requests) == generator.engine.decoder.lanes  # all the calls of a batch start together

    with first_sql_statement_hangs(monkeypatch) as (hung, release, _):
        database = FactsDatabase(folder / "people.db")
        engine = LaneEngine(generator.engine.decoder, params, TOK, tool=database.run, tool_timeout_s=HANG_TIMEOUT_S)
        first = engine.generate(requests)
        assert hung.is_set() and not release.is_set()
        second = engine.generate(requests)  # the hung lookup still hangs
        assert not release.is_set()
    database.close()

    timeout_reply = f"error: the tool timed out after {HANG_TIMEOUT_S:g} s"
    first_calls = [call for c in first for call in c.tool_calls]
    assert [call["reply"] for call in first_calls].count(timeout_reply) == 1, [call["reply"] for call in first_calls]
    for batch in (first, second):
        for record, completion in zip(records, batch):
            if batch is first and any(call["reply"] == timeout_reply for call in completion.tool_calls):
                continue  # the hung question: what it answers after an error reply is not tested
            (call,) = completion.tool_calls
            assert call["ok"] and call["reply"] == record["answer"]
            assert answer_is_correct(generator.format.last_assistant_text(completion.tokens), record["answer"])
            assert completion.finish_reason == "stop"
