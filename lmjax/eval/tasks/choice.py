"""Multiple choice: the choice whose continuation the model finds likeliest. Accuracy, and
accuracy with each choice's log-likelihood divided by its length in characters (the harness's
acc_norm, which stops long choices losing for their length alone).

    multiple_choice=FILE.jsonl   one question a line: {"context": str, "choices": [str, ...], "gold": int}
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmjax.eval.requests import Loglikelihood


def split_encode(tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """(context ids, continuation ids) with the continuation encoded as it sits after the context
    (the pair is encoded whole and split where the context's own encoding ends, as the harness
    does); an empty context becomes the start token (BOS, else end-of-text), the harness's rule."""
    whole = list(tokenizer.encode(context + continuation))
    n_context = len(tokenizer.encode(context)) if context else 0
    context_ids = whole[:n_context] or [start_id(tokenizer)]
    return context_ids, whole[n_context:]


def start_id(tokenizer) -> int:
    """The token a text starts from: BOS when the tokenizer has one, else its end-of-text id."""
    bos = getattr(tokenizer, "bos_id", None)
    token = bos if bos is not None else tokenizer.eos_id
    if token is None:
        from lmjax.eval.tasks import TaskError

        raise TaskError("This tokenizer has neither a BOS nor an end-of-text token to start a text from.")
    return token


def choice_metrics(prefix: str, questions: list[dict], answers) -> dict:
    """eval/{prefix}_acc and _acc_norm over `questions` ({"choices", "gold"}), whose choices'
    Scores come in order in `answers`."""
    correct = correct_norm = at = 0
    for q in questions:
        scores = answers[at: at + len(q["choices"])]
        at += len(q["choices"])
        logprobs = np.array([s.logprob for s in scores])
        lengths = np.array([max(len(c), 1) for c in q["choices"]])
        correct += int(np.argmax(logprobs)) == q["gold"]
        correct_norm += int(np.argmax(logprobs / lengths)) == q["gold"]
    n = max(len(questions), 1)
    return {f"eval/{prefix}_acc": correct / n, f"eval/{prefix}_acc_norm": correct_norm / n}


def read_questions(path) -> list[dict]:
    """The questions of a multiple-choice JSONL file, checked (one-line ValueError naming the line)."""
    from lmjax.eval.tasks import TaskError

    path = Path(path)
    if not path.is_file():
        raise TaskError(f"multiple_choice needs a JSONL file of questions; {str(path)!r} is not a file.")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            ok = isinstance(q["context"], str) and len(q["choices"]) >= 2 and 0 <= int(q["gold"]) < len(q["choices"])
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise TaskError(f'{path}:{number} is not {{"context": str, "choices": [at least 2 str], "gold": index of the right one}}.')
        questions.append({"context": q["context"], "choices": [str(c) for c in q["choices"]], "gold": int(q["gold"])})
    if not questions:
        raise TaskError(f"{str(path)!r} holds no questions.")
    return questions


class MultipleChoice:
    def __init__(self, prefix, questions, tokenizer):
        self.prefix, self.questions, self.tokenizer = prefix, questions, tokenizer

    def requests(self):
        return [Loglikelihood(*split_encode(self.tokenizer, q["context"], choice)) for q in self.questions for choice in q["choices"]]

    def metrics(self, answers):
        return choice_metrics(self.prefix, self.questions, answers)


def multiple_choice(subject, arg, limit):
    from lmjax.eval.tasks import TaskError

    if not arg:
        raise TaskError("multiple_choice needs its questions: --tasks multiple_choice=FILE.jsonl.")
    if subject.tokenizer is None:
        raise TaskError("multiple_choice needs a text tokenizer; this model reads plain ids.")
    questions = read_questions(arg)[: limit or None]
    return MultipleChoice(f"mc_{Path(arg).stem}", questions, subject.tokenizer)


TASKS = {"multiple_choice": multiple_choice}
