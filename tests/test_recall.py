"""`qa_recall` through a real generator: the tiny tool-using model of tests/test_tool_call.py
answers, and the final assistant turn of each completion must end with the whole answer and a
period (f"{answer}." after a non-word character or the start of the turn). Also the looser rule
of the original codebase ("correct_suffix", `eval/{set}_recall_suffix`), kept for comparison."""
import json
from types import SimpleNamespace

import pytest

from test_tool_call import TOK, tool_generator, trained_tool_model

from lmjax.data.facts import ATTRIBUTE_VALUES
from lmjax.dialog import format_for
from lmjax.eval.recall import RecallByGeneration, qa_recall
from lmjax.generate.api import Generator


def with_expected(record, answer):
    return dict(record, answer=answer)


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_qa_recall_counts_whole_answers_ending_with_a_period(tmp_path_factory):
    _, _, _, records = trained_tool_model(tmp_path_factory.getbasetemp())
    generator = tool_generator(tmp_path_factory.getbasetemp())
    first, second = records[1], records[5]  # the birth places of the two people
    asked = [
        first,  # correct
        with_expected(first, first["answer"][:-1]),  # the value's start: no period right after it
        with_expected(first, second["answer"]),  # another person's value
        with_expected(first, f"in {first['answer']}"),  # the end of the sentence, wider than the value
        with_expected(first, first["answer"][1:]),  # the value's end: not a whole answer ("civil engineer." / "engineer")
    ]
    accuracy, details = qa_recall(generator, asked, max_new_tokens=120)
    assert [d["correct"] for d in details] == [True, False, False, True, False]
    assert [d["correct_suffix"] for d in details] == [True, False, False, True, True]  # the original's rule
    assert accuracy == 0.4
    assert {d["answer"] for d in details} == {first["dialog"][-1]["content"]}  # one question, greedy: one answer
    assert [d["expected"] for d in details] == [r["answer"] for r in asked]
    assert all(d["tool_calls"] == 1 and d["people_id"] == first["people_id"] for d in details)


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_without_the_tool_the_query_is_the_final_assistant_turn_and_scores_nothing(tmp_path_factory):
    model, params, _, records = trained_tool_model(tmp_path_factory.getbasetemp())
    generator = Generator(model, params, TOK, lanes=4, max_len=192, chunk=16)  # no tool attached
    accuracy, details = qa_recall(generator, records[:2], max_new_tokens=120)
    assert accuracy == 0.0
    assert [d["answer"] for d in details] == [r["dialog"][1]["content"] for r in records[:2]]
    assert all(d["tool_calls"] == 0 for d in details)


class FixedAnswers:
    """A stand-in generator whose final assistant turns are given texts (one per question)."""

    def __init__(self, texts):
        self.texts, self.format = texts, format_for(TOK)

    def generate(self, questions, **_):
        eod = TOK.special_id("eod")
        return [SimpleNamespace(tokens=[*TOK.encode(text), eod], tool_calls=[]) for text in self.texts[: len(questions)]]


def occupation_record(answer):
    question = {"source": "user", "content": "What does Ada Moreau do for a living?"}
    return {"dialog": [question], "people_id": 0, "attribute": "occupation", "answer": answer}


WHOLE_ANSWER_CASES = [  # (final assistant turn, expected answer, whole answer?, the original's rule?)
    ("Ada Moreau works as a civil engineer.", "engineer", False, True),
    ("Ada Moreau works as a graphic designer.", "designer", False, True),
    ("Ada Moreau works as an engineer.", "engineer", True, True),
    ("Ada Moreau works as a designer.", "designer", True, True),
    ("Ada Moreau works as a civil engineer.", "civil engineer", True, True),
    ("Ada Moreau works as a graphic designer.", "graphic designer", True, True),
    ("engineer.", "engineer", True, True),  # the start of the turn is a boundary too
    ("Ada Moreau works as an engineer", "engineer", False, False),  # no final period
]


def test_a_longer_answer_ending_in_the_expected_one_is_wrong_but_counted_by_the_suffix_rule():
    texts = [text for text, *_ in WHOLE_ANSWER_CASES]
    records = [occupation_record(answer) for _, answer, *_ in WHOLE_ANSWER_CASES]
    accuracy, details = qa_recall(FixedAnswers(texts), records, known_answers=ATTRIBUTE_VALUES)
    assert [d["answer"] for d in details] == texts
    assert [d["correct"] for d in details] == [whole for *_, whole, _ in WHOLE_ANSWER_CASES]
    assert [d["correct_suffix"] for d in details] == [loose for *_, loose in WHOLE_ANSWER_CASES]
    assert accuracy == 5 / 8


def test_recall_by_generation_reports_both_rules_under_their_own_names(tmp_path, monkeypatch):
    import lmjax.generate.api

    texts = ["Ada Moreau works as a civil engineer.", "Ada Moreau works as an engineer."]
    records = [occupation_record("engineer"), occupation_record("engineer")]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(lmjax.generate.api, "Generator", lambda *args, **kwargs: FixedAnswers(texts))
    evaluator = RecallByGeneration({"qa": str(path)}, TOK, known_answers=ATTRIBUTE_VALUES)
    evaluator.prepare(SimpleNamespace(model=None, layout=None, progress=False))
    metrics = evaluator(params=None)
    assert metrics["eval/qa_recall"] == 0.5  # whole answers (the study's metric)
    assert metrics["eval/qa_recall_suffix"] == 1.0  # the original codebase's rule
    assert set(metrics) == set(evaluator.metric_names())
