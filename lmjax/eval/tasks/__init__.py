"""Evaluation tasks by name (`python -m lmjax.eval --tasks ...`, `eval.tasks`, `eval.async_tasks`).

A task is made for one subject (lmjax.eval.evaluator.Subject: a run's checkpoint or imported
weights) by its factory, `factory(subject, arg, limit)`; a task that does not apply to the
subject (facts recall of a Shakespeare run) is a one-line `TaskError`. The task object has

    requests() -> list              lmjax.eval.requests: Loglikelihood | Rolling | GenerateUntil
    metrics(answers) -> dict        {"eval/...": float}, from one answer per request, in order

`run_tasks` answers the requests of every task together (so teacher-forced requests of several
tasks share packed rows) and returns the metrics of all.

    facts_recall      free generation of facts answers, in-tool with the real database; trained and unseen people
    facts_bio         log-likelihood of each fact's value after its biography prefix (recall, bits stored)
    facts_mc          multiple choice among four values of the asked attribute
    shakespeare_bpc   bits per character over the whole Shakespeare validation split (rolling)
    mqar              MQAR query accuracy (log-likelihood of each query's value)
    multiple_choice=FILE.jsonl   any multiple-choice set: {"context", "choices", "gold"} per line
"""
from __future__ import annotations

import time

from lmjax.registry import ConfigError, Registry

EVAL_TASKS = Registry("eval task")


class TaskError(ConfigError):
    """A task that cannot run on this subject or with these arguments (one line, exit status 2)."""


def parse_task_list(text: str) -> list[tuple[str, str | None]]:
    """'facts_recall,multiple_choice=q.jsonl' -> [('facts_recall', None), ('multiple_choice', 'q.jsonl')];
    an unknown name is a TaskError listing the known ones."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, arg = item.partition("=")
        if name not in EVAL_TASKS.names():
            raise TaskError(f"Unknown eval task {name!r}; choose one of: {', '.join(EVAL_TASKS.names())}.")
        specs.append((name, arg or None))
    if not specs:
        raise TaskError(f"No evaluation task named; choose from: {', '.join(EVAL_TASKS.names())}.")
    return specs


# data.name (and facts mode) of a run -> the tasks `python -m lmjax.eval` runs when none are named
DEFAULT_TASKS = {
    "facts/weights": "facts_recall,facts_mc", "facts/tool": "facts_recall", "facts/bio": "facts_bio",
    "shakespeare": "shakespeare_bpc", "text": "shakespeare_bpc", "mqar": "mqar",
}


def default_tasks(subject) -> str:
    """The subject's default task list: `eval.tasks` of its run, else its data task's, else
    (imported weights) shakespeare_bpc."""
    c = subject.config
    if c is None:
        return "shakespeare_bpc"
    if c.eval.tasks:
        return c.eval.tasks
    key = f"facts/{c.data.mode}" if c.data.name == "facts" else c.data.name
    return DEFAULT_TASKS.get(key, "")


def make_tasks(subject, specs, limit=None) -> dict:
    """Task name (with its argument) -> task object for `subject`."""
    return {(f"{name}={arg}" if arg else name): EVAL_TASKS.get(name)(subject, arg, limit) for name, arg in specs}


def run_tasks(tasks: dict, evaluator) -> dict:
    """Metrics of every task, their requests answered together by `evaluator`, plus
    time/eval_s."""
    started = time.perf_counter()
    requests = {name: task.requests() for name, task in tasks.items()}
    flat = [r for rs in requests.values() for r in rs]
    answers = evaluator.answer(flat)
    metrics, at = {}, 0
    for name, task in tasks.items():
        n = len(requests[name])
        metrics.update(task.metrics(answers[at: at + n]))
        at += n
    metrics["time/eval_s"] = time.perf_counter() - started
    return metrics


def _register():
    from lmjax.eval.tasks import choice, facts, mqar, text

    for module in (choice, facts, mqar, text):
        for name, factory in module.TASKS.items():
            EVAL_TASKS.register(name)(factory)


_register()
