"""Facts tasks, for runs of the facts task (lmjax.tasks.facts); they read the run's data folder.

    facts_recall   each question answered by free generation (in-tool: the model queries the
                   real database and answers from its reply), scored on the whole answer
                   (lmjax.dialog.answer_is_correct): eval/qa_recall on trained people,
                   eval/qa_unseen_recall on unseen ones (in-weight: what guessing gets),
                   _recall_suffix by the original codebase's looser rule, _tool_calls per question.
                   The same generation as the trainer's end-of-training recall (eval.recall).
    facts_bio      each fact's value after its biography prefix: eval/bio_acc (greedy would write
                   it), eval/bio_loss (nats a value token), eval/bio_bits (bits stored), per attribute
                   too; the same numbers as the bio mode's evaluator (lmjax.eval.stored_bits).
    facts_mc       each question with four answers (the true value and three other people's
                   values of the attribute, drawn by the data seed), each scored by the
                   log-likelihood of its value in the answer sentence: eval/facts_mc_acc, _acc_norm.
"""
from __future__ import annotations

import numpy as np

from lmjax.eval.requests import GenerateUntil, Loglikelihood

MAX_ANSWER_TOKENS = 128  # what the trainer's recall lets an answer take
MC_CHOICES = 4


def _facts_run(subject, task_name):
    """The run's facts data folder; TaskError unless `subject` is a facts run whose data exists."""
    from lmjax.eval.tasks import TaskError
    from lmjax.run_dir import require_facts_data

    if subject.config is None or subject.config.data.name != "facts":
        what = f"a {subject.config.data.name} run" if subject.config is not None else "imported weights"
        raise TaskError(f"{task_name} needs a facts run (--workdir of a facts training run); this is {what}.")
    try:
        return require_facts_data(subject.config, subject.workdir)
    except FileNotFoundError as error:
        raise TaskError(str(error)) from None


def dialog_loglikelihood(tokenizer, dialog, answer: str) -> Loglikelihood:
    """log p(answer tokens | the dialog before them), as the dialog format renders it."""
    from lmjax.dialog import encode_dialog

    encoded = encode_dialog(tokenizer, dialog, answer=answer)
    tokens = list(encoded["tokens"])
    marked = np.flatnonzero(encoded["answer_mask"])
    first, last = int(marked[0]), int(marked[-1])
    return Loglikelihood(tokens[:first], tokens[first: last + 1], prompt=int(np.sum(encoded["prompt_mask"][:first])))


class FactsRecall:
    def __init__(self, sets: dict, tokenizer, tool, limit):
        from lmjax.data.facts import ATTRIBUTE_VALUES, read_dialogs
        from lmjax.dialog import format_for

        self.format = format_for(tokenizer)
        self.records = {name: read_dialogs(path)[: limit or None] for name, path in sets.items()}
        self.tool, self.known = tool, ATTRIBUTE_VALUES

    def requests(self):
        from lmjax.dialog import user_question

        return [
            GenerateUntil(self.format.prompt(user_question(r["dialog"])), max_new_tokens=MAX_ANSWER_TOKENS, tool=self.tool)
            for records in self.records.values() for r in records
        ]

    def metrics(self, answers):
        from lmjax.dialog import answer_is_correct, answer_is_suffix

        metrics, at = {}, 0
        for name, records in self.records.items():
            correct = suffix = calls = 0
            for record, generated in zip(records, answers[at: at + len(records)]):
                text = self.format.last_assistant_text(generated.tokens)
                correct += answer_is_correct(text, record["answer"], self.known.get(record["attribute"], ()))
                suffix += answer_is_suffix(text, record["answer"])
                calls += len(generated.tool_calls)
            at += len(records)
            n = max(len(records), 1)
            metrics.update({f"eval/{name}_recall": correct / n, f"eval/{name}_recall_suffix": suffix / n,
                            f"eval/{name}_tool_calls": calls / n})
        return metrics


def facts_recall(subject, arg, limit):
    from lmjax.tasks.facts import recall_files
    from lmjax.tools import TOOLS

    folder = _facts_run(subject, "facts_recall")
    d = subject.config.data
    sets = {name: str(path) for name, path in recall_files(d, folder).items()}
    sets.setdefault("qa_unseen", str(folder / "qa_unseen.jsonl"))  # in-weight: what guessing gets
    tool = TOOLS.get("facts")(folder) if d.mode == "tool" else None
    return FactsRecall(sets, subject.tokenizer, tool, limit)


class FactsBio:
    def __init__(self, records, tokenizer):
        self.records, self.tokenizer = records, tokenizer

    def requests(self):
        return [dialog_loglikelihood(self.tokenizer, r["dialog"], r["answer"]) for r in self.records]

    def metrics(self, answers):
        from lmjax.results.capacity import attribute_bits, stored_bits

        value_bits, by_attribute = attribute_bits(), {}
        for record, score in zip(self.records, answers):
            by_attribute.setdefault(record["attribute"], []).append(score)
        metrics, exact, loss, tokens, bits = {}, 0, 0.0, 0, 0.0
        for attribute, scores in by_attribute.items():
            attribute_loss = -sum(s.logprob for s in scores)
            attribute_bits_stored = float(stored_bits(len(scores), value_bits[attribute], attribute_loss))
            metrics[f"eval/bio_{attribute}_acc"] = sum(s.greedy for s in scores) / len(scores)
            metrics[f"eval/bio_{attribute}_bits"] = attribute_bits_stored
            exact, bits = exact + sum(s.greedy for s in scores), bits + attribute_bits_stored
            loss, tokens = loss + attribute_loss, tokens + sum(s.tokens for s in scores)
        metrics.update({"eval/bio_acc": exact / max(len(self.records), 1), "eval/bio_loss": loss / max(tokens, 1),
                        "eval/bio_bits": bits})
        return metrics


def facts_bio(subject, arg, limit):
    from lmjax.data import facts

    _facts_run(subject, "facts_bio")
    d = subject.config.data
    people = facts.build_population(d.num_people, d.seed, d.num_unseen, d.alpha)[: d.num_people]
    records = [r for i, person in enumerate(people) for r in facts.biography_prefix_records(i, person)]
    return FactsBio(records[: limit or None], subject.tokenizer)


def mc_questions(records, people, seed) -> list[dict]:
    """Per qa record: the dialog before the answer, four answer sentences and the part of each
    that is scored, its value (with the article of an occupation): the true one at `gold`, three
    other values of the attribute, from other people, drawn by `seed`."""
    from lmjax.data.facts import answer_sentence, scored_value

    rng = np.random.default_rng([seed, 7])
    questions = []
    for r in records:
        attribute = r["attribute"]
        others = sorted({p[attribute] for p in people} - {r["answer"]})
        picked = [others[i] for i in rng.choice(len(others), size=min(MC_CHOICES - 1, len(others)), replace=False)]
        gold = int(rng.integers(len(picked) + 1))
        values = picked[:gold] + [r["answer"]] + picked[gold:]
        name = people[r["people_id"]]["name"]
        questions.append({"dialog": r["dialog"][:-1], "sentences": [answer_sentence(name, attribute, v) for v in values],
                          "choices": [scored_value(attribute, v) for v in values], "gold": gold})
    return questions


class FactsChoice:
    def __init__(self, questions, tokenizer):
        self.questions, self.tokenizer = questions, tokenizer

    def requests(self):
        return [
            dialog_loglikelihood(self.tokenizer, q["dialog"] + [{"source": "assistant", "content": sentence}], choice)
            for q in self.questions for sentence, choice in zip(q["sentences"], q["choices"])
        ]

    def metrics(self, answers):
        from lmjax.eval.tasks.choice import choice_metrics

        return choice_metrics("facts_mc", self.questions, answers)


def facts_mc(subject, arg, limit):
    from lmjax.data import facts
    from lmjax.eval.tasks import TaskError

    folder = _facts_run(subject, "facts_mc")
    d = subject.config.data
    if d.mode == "tool":
        raise TaskError("facts_mc scores answers from the weights; an in-tool run answers from the database (use facts_recall).")
    people = facts.build_population(d.num_people, d.seed, d.num_unseen, d.alpha)
    records = facts.read_dialogs(folder / "qa.jsonl")[: limit or None]
    return FactsChoice(mc_questions(records, people, d.seed), subject.tokenizer)


TASKS = {"facts_recall": facts_recall, "facts_bio": facts_bio, "facts_mc": facts_mc}
