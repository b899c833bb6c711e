"""Teacher-forced evaluation: per-dialog exact match of answer tokens, per-token accuracy at marked
positions (MQAR queries), and mean loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax.data.pipeline import padded_batches


def make_eval_step(apply_fn, *, layout=None, param_shardings=None):
    """Jitted (params, batch) -> per-row sums: loss, loss tokens, answer tokens, correct answer tokens.

    With a `layout`: host batches are split by rows over `data`, the sums come back replicated
    (readable on every process).
    """

    def eval_step(params, batch):
        logits = apply_fn({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"], batch["prompt"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        loss_mask = batch["loss_mask"].astype(jnp.float32)
        answer_mask = batch["answer_mask"].astype(jnp.int32)
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.int32)
        return {
            "loss_sum": jnp.sum(losses * loss_mask, axis=1),
            "loss_tokens": jnp.sum(loss_mask, axis=1),
            "answer_tokens": jnp.sum(answer_mask, axis=1),
            "answer_correct": jnp.sum(correct * answer_mask, axis=1),
        }

    if layout is None:
        return jax.jit(eval_step)
    jitted = layout.jit(eval_step, in_shardings=(param_shardings, layout.rows()), out_shardings=layout.replicated)
    return lambda params, batch: jitted(params, layout.put_rows(batch))


def _round_up(n, multiple=16):
    return -(-n // multiple) * multiple


def eval_batches(examples, batch_size):
    """Fixed-shape padded batches of one eval set, built once per run: [(batch, n_real_rows)]."""
    def complete(example):
        zeros = np.zeros_like(example["inputs"])
        return {"answer_mask": zeros, "prompt": zeros, **example}

    examples = [complete(e) for e in examples]
    seq_len = _round_up(max(len(e["inputs"]) for e in examples))
    keys = ("inputs", "targets", "loss_mask", "answer_mask", "prompt")
    return list(padded_batches(examples, seq_len=seq_len, batch_size=batch_size, keys=keys))


NO_TOTALS = {"loss_sum": 0.0, "loss_tokens": 0.0, "answered": 0, "exact": 0, "answer_tokens": 0, "answer_correct": 0}


def evaluate(eval_step, params, batches):
    """Summed statistics over the batches of one eval set."""
    totals = dict(NO_TOTALS)
    for batch, n_real in batches:
        out = jax.device_get(eval_step(params, batch))
        out = {k: v[:n_real] for k, v in out.items()}
        totals["loss_sum"] += float(out["loss_sum"].sum())
        totals["loss_tokens"] += float(out["loss_tokens"].sum())
        has_answer = out["answer_tokens"] > 0
        totals["answered"] += int(has_answer.sum())
        totals["exact"] += int((has_answer & (out["answer_correct"] == out["answer_tokens"])).sum())
        totals["answer_tokens"] += int(out["answer_tokens"].sum())
        totals["answer_correct"] += int(out["answer_correct"].sum())
    return totals


def answer_exact_match(name, totals):
    """Dialogs: eval/{set}_acc, the fraction whose answer tokens are all right, and _loss."""
    return {f"eval/{name}_acc": totals["exact"] / max(totals["answered"], 1), f"eval/{name}_loss": _loss(totals)}


def token_accuracy(name, totals):
    """Marked tokens (MQAR queries): eval/{set}_acc per token, _seq_acc per sequence (all of its
    tokens right), and _loss."""
    return {
        f"eval/{name}_acc": totals["answer_correct"] / max(totals["answer_tokens"], 1),
        f"eval/{name}_seq_acc": totals["exact"] / max(totals["answered"], 1),
        f"eval/{name}_loss": _loss(totals),
    }


def mean_loss(name, totals):
    """Text: eval/loss for the validation split, eval/{set}_loss for others."""
    return {"eval/loss" if name == "val" else f"eval/{name}_loss": _loss(totals)}


def _loss(totals):
    return totals["loss_sum"] / max(totals["loss_tokens"], 1)


class TeacherForced:
    """Periodic evaluator: fixed-shape padded batches of each set, built once, scored by one
    jitted step; `summarize(name, totals)` turns a set's summed statistics into metrics."""

    at_end = False

    def __init__(self, sets: dict, summarize, *, batch_size: int):
        self.batches = {name: eval_batches(examples, batch_size) for name, examples in sets.items()}
        self.summarize = summarize
        self.step = None

    def metric_names(self) -> list:
        """The names `__call__` reports: `summarize` of empty statistics has the same keys."""
        return sorted(key for name in self.batches for key in self.summarize(name, dict(NO_TOTALS)))

    def prepare(self, env):
        self.step = make_eval_step(env.model.apply, layout=env.layout, param_shardings=env.param_shardings)

    def __call__(self, params) -> dict:
        metrics = {}
        for name, batches in self.batches.items():
            metrics.update(self.summarize(name, evaluate(self.step, params, batches)))
        return metrics
