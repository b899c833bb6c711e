"""mqar: the run's MQAR evaluation sequences (the same ones the trainer scores), one
log-likelihood request per query: its value given the sequence up to the query's key.
eval/mqar_acc (queries answered greedily), eval/mqar_seq_acc (sequences with every query right),
eval/mqar_loss (nats a query)."""
from __future__ import annotations

import numpy as np

from lmjax.eval.requests import Loglikelihood


class Mqar:
    def __init__(self, arrays):
        self.arrays = arrays
        self.queries = [np.flatnonzero(mask) for mask in arrays["loss_mask"]]

    def requests(self):
        inputs, targets = self.arrays["inputs"], self.arrays["targets"]
        return [Loglikelihood(inputs[s, : q + 1], [targets[s, q]]) for s, qs in enumerate(self.queries) for q in qs]

    def metrics(self, answers):
        hits, at, whole = 0, 0, 0
        for qs in self.queries:
            right = sum(a.greedy for a in answers[at: at + len(qs)])
            hits, whole, at = hits + right, whole + (right == len(qs)), at + len(qs)
        return {
            "eval/mqar_acc": hits / max(at, 1),
            "eval/mqar_seq_acc": whole / max(len(self.queries), 1),
            "eval/mqar_loss": -sum(a.logprob for a in answers) / max(at, 1),
        }


def mqar(subject, arg, limit):
    from lmjax.data import mqar as data
    from lmjax.eval.tasks import TaskError

    c = subject.config
    if c is None or c.data.name != "mqar":
        raise TaskError("mqar needs an MQAR run (--workdir of a run with data.name=mqar).")
    d = c.data
    arrays = data.generate(  # all of them, then the first `limit`: the draw depends on the count
        d.num_eval, seed=[d.seed, 1], vocab_size=d.vocab_size, seq_len=d.seq_len,
        num_kv_pairs=d.num_kv_pairs, power_a=d.power_a, variant=d.variant, num_reassigned=d.num_reassigned,
    )
    return Mqar({key: value[: limit or None] for key, value in arrays.items()})


TASKS = {"mqar": mqar}
