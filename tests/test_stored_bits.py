"""lmjax/eval/stored_bits.py against a brute-force count: each fact scored alone by a full forward pass."""
import math

import jax
import numpy as np
import pytest

from lmjax.data import facts
from lmjax.data.tokenizers.byte import ByteTokenizer
from lmjax.dialog import encode_dialog, to_training_example
from lmjax.eval import EvalEnv
from lmjax.eval.stored_bits import StoredBits
from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.results.capacity import attribute_bits


@pytest.fixture(scope="module")
def model_and_records():
    model = Transformer(TransformerConfig(vocab_size=260, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=64))
    params = model.init(jax.random.PRNGKey(1), np.zeros((1, 8), np.int32))["params"]
    people = facts.build_population(5, seed=0, num_unseen=0)
    records = [r for i, p in enumerate(people) for r in facts.biography_prefix_records(i, p)]
    return model, params, records


def examples_by_attribute(records):
    tokenizer, out = ByteTokenizer(), {}
    for r in records:
        out.setdefault(r["attribute"], []).append(to_training_example(encode_dialog(tokenizer, r["dialog"], answer=r["answer"])))
    return out


def brute_force(model, params, records):
    """Per attribute: (facts all of whose value tokens are the argmax, summed value-token loss in nats)."""
    tokenizer, out = ByteTokenizer(), {}
    # One compile: every example right-padded to one length (causal: padding after a token never changes it).
    apply = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    for r in records:
        e = to_training_example(encode_dialog(tokenizer, r["dialog"], answer=r["answer"]))
        padded = np.zeros((1, 192), np.int32)
        padded[0, : len(e["inputs"])] = e["inputs"]
        logits = np.asarray(apply(padded)[0, : len(e["inputs"])], np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        at = np.flatnonzero(e["answer_mask"])
        targets = e["targets"][at]
        exact = bool((np.argmax(log_probs[at], -1) == targets).all())
        loss = -float(log_probs[at, targets].sum())
        hits, total = out.get(r["attribute"], (0, 0.0))
        out[r["attribute"]] = (hits + exact, total + loss)
    return out


def test_recall_and_bits_equal_the_brute_force_count(model_and_records):
    model, params, records = model_and_records
    by_attribute = examples_by_attribute(records)
    evaluator = StoredBits("bio", by_attribute, attribute_bits(), batch_size=8)
    evaluator.prepare(EvalEnv(model=model))
    metrics = evaluator(params)
    assert set(metrics) == set(evaluator.metric_names())
    reference = brute_force(model, params, records)
    total_bits = 0.0
    for attribute, (hits, loss) in reference.items():
        n = len(by_attribute[attribute])
        assert metrics[f"eval/bio_{attribute}_acc"] == hits / n
        expected = max(0.0, n * attribute_bits()[attribute] - loss / math.log(2))
        assert metrics[f"eval/bio_{attribute}_bits"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
        total_bits += expected
    assert metrics["eval/bio_bits"] == pytest.approx(total_bits, rel=1e-4, abs=1e-3)
    assert metrics["eval/bio_acc"] == sum(h for h, _ in reference.values()) / len(records)
    value_tokens = sum(int(e["answer_mask"].sum()) for examples in by_attribute.values() for e in examples)
    assert metrics["eval/bio_loss"] == pytest.approx(sum(l for _, l in reference.values()) / value_tokens, rel=1e-4)


def test_a_model_that_knows_the_facts_stores_all_their_bits(model_and_records):
    """An oracle that puts all its mass on the next input token (the answer tokens are never a
    segment's last): every fact recalled, every bit stored."""
    _, _, records = model_and_records

    class Oracle:
        def apply(self, variables, inputs, *rest):
            return 50.0 * jax.nn.one_hot(jax.numpy.roll(inputs, -1, axis=1), 260)

    evaluator = StoredBits("bio", examples_by_attribute(records), attribute_bits(), batch_size=32)
    evaluator.prepare(EvalEnv(model=Oracle()))
    metrics = evaluator({})
    assert metrics["eval/bio_acc"] == 1.0
    for attribute, bits in attribute_bits().items():
        assert metrics[f"eval/bio_{attribute}_bits"] == pytest.approx(5 * bits, rel=1e-6)


def test_scored_values_end_each_prefix_and_carry_the_article():
    people = facts.build_population(20, seed=3, num_unseen=0)
    for i, person in enumerate(people):
        records = facts.biography_prefix_records(i, person)
        assert [r["attribute"] for r in records] == list(facts.ATTRIBUTES)
        full = facts.biography_dialog(i, person)["dialog"][0]["content"]
        for r in records:
            text = r["dialog"][0]["content"]
            assert full.startswith(text) and text.endswith(f" {r['answer']}.")
        occupation = records[-1]["answer"]
        article, value = occupation.split(" ", 1)
        assert value == person["occupation"] and article == ("an" if value[0] in "aeiou" else "a")
