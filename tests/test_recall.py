"""`qa_recall` through a real generator: the tiny tool-using model of tests/test_tool_call.py
answers, and the final assistant turn of each completion must end with f"{answer}."."""
from test_tool_call import TOK, tool_generator, trained_tool_model

from lmjax.eval.recall import qa_recall
from lmjax.generate.api import Generator


def with_expected(record, answer):
    return dict(record, answer=answer)


def test_qa_recall_counts_answers_ending_with_the_value_and_a_period(tmp_path_factory):
    _, _, _, records = trained_tool_model(tmp_path_factory.getbasetemp())
    generator = tool_generator(tmp_path_factory.getbasetemp())
    first, second = records[1], records[5]  # the birth places of the two people
    asked = [
        first,  # correct
        with_expected(first, first["answer"][:-1]),  # the value's start: no period right after it
        with_expected(first, second["answer"]),  # another person's value
        with_expected(first, f"in {first['answer']}"),  # the end of the sentence, wider than the value
    ]
    accuracy, details = qa_recall(generator, asked, max_new_tokens=120)
    assert [d["correct"] for d in details] == [True, False, False, True]
    assert accuracy == 0.5
    assert {d["answer"] for d in details} == {first["dialog"][-1]["content"]}  # one question, greedy: one answer
    assert [d["expected"] for d in details] == [r["answer"] for r in asked]
    assert all(d["tool_calls"] == 1 and d["people_id"] == first["people_id"] for d in details)


def test_without_the_tool_the_query_is_the_final_assistant_turn_and_scores_nothing(tmp_path_factory):
    model, params, _, records = trained_tool_model(tmp_path_factory.getbasetemp())
    generator = Generator(model, params, TOK, lanes=4, max_len=192, chunk=16)  # no tool attached
    accuracy, details = qa_recall(generator, records[:2], max_new_tokens=120)
    assert accuracy == 0.0
    assert [d["answer"] for d in details] == [r["dialog"][1]["content"] for r in records[:2]]
    assert all(d["tool_calls"] == 0 for d in details)
