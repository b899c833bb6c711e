"""The recall rule: the last assistant turn of a generated dialog must end with f"{answer}."."""
from lmjax.data.tokenizer import ByteTokenizer
from lmjax.eval.recall import last_assistant_text, qa_recall
from lmjax.generate.engine import Completion, DialogFormat

TOK = ByteTokenizer()
FMT = DialogFormat.for_tokenizer(TOK)
A, DB, EOD = TOK.special_id("assistant"), TOK.special_id("database"), TOK.eod_id


def completion(tokens):
    return Completion(None, [], tokens, TOK.decode(tokens), "stop")


class FakeGenerator:
    """Answers question i with scripted[i]; records the prompts it was given."""

    tokenizer, format = TOK, FMT

    def __init__(self, scripted):
        self.scripted, self.prompts = scripted, []

    def generate(self, prompts, **_):
        self.prompts += prompts
        return [completion(tokens) for tokens in self.scripted]


def record(question, answer):
    return {"dialog": [{"source": "user", "content": question}], "people_id": 0, "attribute": "birth_place", "answer": answer}


def test_last_assistant_text_skips_the_query_and_the_reply():
    tokens = [*TOK.encode("```sql\nFIND x FOR y\n```"), DB, *TOK.encode("Peru"), A, *TOK.encode("Y was born in Peru."), EOD]
    assert last_assistant_text(completion(tokens), TOK, A, set(FMT.stop_ids)) == "Y was born in Peru."
    assert last_assistant_text(completion(TOK.encode("No stop")), TOK, A, set(FMT.stop_ids)) == "No stop"


def test_qa_recall_counts_answers_ending_with_the_value_and_a_period():
    scripted = [
        [*TOK.encode("Ada was born in Peru."), EOD],  # correct
        [*TOK.encode("Ada was born in Peru"), EOD],  # no period
        [*TOK.encode("Bo was born in Chile."), EOD],  # wrong value
        [*TOK.encode("q"), DB, *TOK.encode("Peru"), A, *TOK.encode("Cy was born in Peru."), EOD],  # via the tool
    ]
    generator = FakeGenerator(scripted)
    records = [record("Where was Ada born?", "Peru"), record("Where was Ada born?", "Peru"),
               record("Where was Bo born?", "Peru"), record("Where was Cy born?", "Peru")]
    accuracy, details = qa_recall(generator, records)
    assert [d["correct"] for d in details] == [True, False, False, True]
    assert accuracy == 0.5 and generator.prompts[0] == "Where was Ada born?"
