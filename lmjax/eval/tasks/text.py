"""shakespeare_bpc: bits per character over the WHOLE Shakespeare validation split, one rolling
log-likelihood request (windows of the evaluator's length, each predicting new tokens given as
many earlier ones as fit), with the model's own tokenizer.

Validation is the run's (`data.val_fraction` of a shakespeare run; 0.05 otherwise: the tail of
the plays, `lmjax.data.shakespeare.split_train_val`). Reported: eval/shakespeare_bpc (bits per
character), _bpb (per UTF-8 byte), _loss (nats per token), _tokens. Without a BOS token the
first token is context only, and its characters are left out of the count.
"""
from __future__ import annotations

import math

from lmjax.eval.requests import Rolling

DEFAULT_VAL_FRACTION = 0.05


class ShakespeareBpc:
    def __init__(self, text, tokenizer):
        self.text, self.tokenizer = text, tokenizer
        self.tokens = list(tokenizer.encode(text))
        self.prefix = getattr(tokenizer, "bos_id", None)

    def requests(self):
        return [Rolling(self.tokens, prefix=self.prefix)]

    def metrics(self, answers):
        score, = answers
        scored_text = self.text if self.prefix is not None else self.text[len(self.tokenizer.decode(self.tokens[:1])):]
        bits = -score.logprob / math.log(2)
        return {
            "eval/shakespeare_bpc": bits / max(len(scored_text), 1),
            "eval/shakespeare_bpb": bits / max(len(scored_text.encode("utf-8")), 1),
            "eval/shakespeare_loss": -score.logprob / max(score.tokens, 1),
            "eval/shakespeare_tokens": float(score.tokens),
        }


def shakespeare_bpc(subject, arg, limit):
    """`limit`: the first `limit` characters of the split only (for quick checks)."""
    from lmjax.data import shakespeare
    from lmjax.eval.tasks import TaskError

    if subject.tokenizer is None:
        raise TaskError("shakespeare_bpc needs a text tokenizer; this model reads plain ids (an MQAR run).")
    c = subject.config
    fraction = c.data.val_fraction if c is not None and c.data.name in ("shakespeare", "text") else DEFAULT_VAL_FRACTION
    _, val_text = shakespeare.split_train_val(shakespeare.load_text(), fraction)
    return ShakespeareBpc(val_text[: limit or None], subject.tokenizer)


TASKS = {"shakespeare_bpc": shakespeare_bpc}
