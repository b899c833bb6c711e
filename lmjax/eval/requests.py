"""What an evaluation task asks of a model: three request kinds and their answers.

    Loglikelihood(context, continuation)   -> Score       log p(continuation | context)
    Rolling(tokens, prefix)                -> Score       log p(tokens): perplexity, bits per character
    GenerateUntil(context, until, ...)     -> Generated   greedy text, cut before the first stop string

Token ids everywhere (tasks encode with the model's tokenizer), so that a request means the same
to every backend. `lmjax.eval.evaluator.RequestEvaluator` answers them in fixed-shape batches.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


def _ids(tokens) -> tuple:
    return tuple(int(t) for t in tokens)


@dataclasses.dataclass(frozen=True)
class Loglikelihood:
    """log p(continuation | context). A context too long for the evaluator's window loses its
    oldest tokens (as the harness's backends do); a continuation must fit the window. `prompt`:
    how many leading context tokens are a prefix-LM prompt (models with `prefix_lm` attend
    both ways among them, as in training; 0 for causal scoring)."""

    context: tuple
    continuation: tuple
    prompt: int = 0

    def __post_init__(self):
        object.__setattr__(self, "context", _ids(self.context))
        object.__setattr__(self, "continuation", _ids(self.continuation))
        if not self.continuation:
            raise ValueError("A Loglikelihood request needs at least one continuation token.")
        if not self.context:
            raise ValueError("A Loglikelihood request needs at least one context token (e.g. a BOS id) to predict the first continuation token from.")


@dataclasses.dataclass(frozen=True)
class Rolling:
    """log p(tokens) of a whole text, over windows of the evaluator's length with disjoint
    predictions: each window predicts tokens the previous ones did not, given as many earlier
    tokens as fit. With `prefix` (a BOS or end-of-text id) every token is scored, the first given
    the prefix; without it, the first token is context only."""

    tokens: tuple
    prefix: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "tokens", _ids(self.tokens))
        if len(self.tokens) < (1 if self.prefix is not None else 2):
            raise ValueError("A Rolling request needs a token to score (two without a prefix token).")


@dataclasses.dataclass(frozen=True)
class GenerateUntil:
    """Greedy continuation of `context` through the lane engine, at most `max_new_tokens` tokens,
    cut before the first of the `until` strings. `tool`: query -> reply (lmjax.tools), executed
    whenever the model calls it; None = no tool."""

    context: tuple
    until: tuple = ()
    max_new_tokens: int = 128
    tool: Callable[[str], str] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "context", _ids(self.context))
        object.__setattr__(self, "until", tuple(self.until))
        if not self.context:
            raise ValueError("A GenerateUntil request needs a non-empty context.")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}.")


@dataclasses.dataclass(frozen=True)
class Score:
    logprob: float  # natural log, summed over the scored tokens
    tokens: int  # tokens scored
    greedy_tokens: int  # of them, those that are the model's argmax

    @property
    def greedy(self) -> bool:
        """Whether greedy decoding would write exactly the scored tokens."""
        return self.greedy_tokens == self.tokens


@dataclasses.dataclass(frozen=True)
class Generated:
    text: str  # cut before the first stop string
    tokens: list  # everything generated after the context (tool replies included)
    tool_calls: list = dataclasses.field(default_factory=list)  # {query, reply, ok, seconds}
    finish_reason: str = ""  # stop | length | until | cache_full
    raw: Any = dataclasses.field(default=None, repr=False, compare=False)  # the engine's Completion


def cut_at_stop(text: str, until) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
