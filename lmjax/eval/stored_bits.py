"""Periodic evaluator: how many facts a model recalls and how many bits it stores, per attribute.

Each example is a dialog whose answer mask marks one fact's value; its loss mask is set to the
same tokens, so the summed loss is the cross-entropy of the values alone. Reported, for a set
`name` of facts grouped by attribute:
  eval/{name}_acc          facts whose value tokens are all the model's greedy choices
                           (= greedy generation would write the value after the same prefix)
  eval/{name}_loss         mean cross-entropy per value token (nats)
  eval/{name}_bits         bits stored, summed over attributes (lmjax.results.capacity.stored_bits)
  eval/{name}_{attr}_acc, eval/{name}_{attr}_bits   the same for one attribute
"""
from lmjax.eval.teacher_forced import NO_TOTALS, TeacherForced, evaluate
from lmjax.results.capacity import stored_bits


def value_loss_example(example: dict) -> dict:
    """A training example whose loss covers exactly its answer (the fact's value) tokens."""
    return {**example, "loss_mask": example["answer_mask"].copy()}


class StoredBits(TeacherForced):
    def __init__(self, name: str, by_attribute: dict, value_bits: dict, *, batch_size: int):
        """`by_attribute`: attribute -> examples (each with an answer mask); `value_bits`:
        attribute -> log2(number of values it can take)."""
        missing = sorted(set(by_attribute) - set(value_bits))
        if missing:
            raise ValueError(f"No value count for attribute(s) {', '.join(missing)}.")
        sets = {attribute: [value_loss_example(e) for e in examples] for attribute, examples in by_attribute.items()}
        super().__init__(sets, summarize=None, batch_size=batch_size)
        self.name, self.value_bits = name, value_bits

    def metric_names(self) -> list:
        return sorted(self._summary({attribute: dict(NO_TOTALS) for attribute in self.batches}))

    def __call__(self, params) -> dict:
        return self._summary({attribute: evaluate(self.step, params, batches) for attribute, batches in self.batches.items()})

    def _summary(self, totals_by_attribute: dict) -> dict:
        prefix = f"eval/{self.name}"
        metrics, exact, answered, loss_sum, loss_tokens, bits = {}, 0, 0, 0.0, 0.0, 0.0
        for attribute, totals in totals_by_attribute.items():
            attribute_bits = float(stored_bits(totals["answered"], self.value_bits[attribute], totals["loss_sum"]))
            metrics[f"{prefix}_{attribute}_acc"] = totals["exact"] / max(totals["answered"], 1)
            metrics[f"{prefix}_{attribute}_bits"] = attribute_bits
            exact, answered, bits = exact + totals["exact"], answered + totals["answered"], bits + attribute_bits
            loss_sum, loss_tokens = loss_sum + totals["loss_sum"], loss_tokens + totals["loss_tokens"]
        metrics[f"{prefix}_acc"] = exact / max(answered, 1)
        metrics[f"{prefix}_loss"] = loss_sum / max(loss_tokens, 1)
        metrics[f"{prefix}_bits"] = bits
        return metrics
