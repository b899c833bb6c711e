"""Datasets by name (`data.name`): each turns a config into training examples and eval sets."""
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmjax.registry import ConfigError, Registry

DATASETS = Registry("data.name")
FACTS_MODES = ("weights", "tool")


@dataclasses.dataclass
class TaskData:
    kind: str  # "facts" (dialogs with answers), "text" (next-token windows) or "mqar" (recall queries)
    vocab_size: int
    train: Sequence[dict]
    eval_sets: dict  # name -> examples; facts examples carry `answer_mask`
    info: dict = dataclasses.field(default_factory=dict)
    tokenizer: Any = None


@DATASETS.register("facts")
class Facts:
    @staticmethod
    def validate(config):
        d = config.data
        if d.mode not in FACTS_MODES:
            raise ConfigError(f"Unknown facts mode {d.mode!r} in data.mode; choose one of: {', '.join(FACTS_MODES)}.")
        if d.num_people <= 0:
            raise ConfigError(f"data.num_people must be positive, got {d.num_people}.")
        if config.model.vocab_size < 260:
            raise ConfigError(f"model.vocab_size={config.model.vocab_size} is below the byte tokenizer's 260 ids.")

    @staticmethod
    def build(config, workdir) -> TaskData:
        from lmjax.data import facts
        from lmjax.data.dialogs import encode_dialog, to_training_example
        from lmjax.data.tokenizer import ByteTokenizer

        d = config.data
        cache_root = Path(d.cache_dir) if d.cache_dir else Path(workdir) / "data"
        folder = facts.load_or_generate(
            cache_root, num_people=d.num_people, seed=d.seed, num_unseen=d.num_unseen, alpha=d.alpha
        )
        tokenizer = ByteTokenizer()

        def examples(filename, loss_on="assistant"):
            return [
                to_training_example(encode_dialog(tokenizer, r["dialog"], loss_on, answer=r["answer"]))
                for r in facts.read_dialogs(folder / filename)
            ]

        qa = examples("qa.jsonl" if d.mode == "weights" else "qatool.jsonl")
        train = qa + examples("biographies.jsonl", loss_on="all") if d.include_biographies else qa
        if d.mode == "tool" and d.get("tool_practice_people", 0):
            names = {person["name"] for person in facts.build_population(d.num_people, d.seed, d.num_unseen, d.alpha)}
            practice = facts.tool_practice_dialogs(d.tool_practice_people, d.seed, names)
            train = train + [
                to_training_example(encode_dialog(tokenizer, r["dialog"], answer=r["answer"])) for r in practice
            ]
        eval_sets = {"qa": qa}
        recall_sets = {"qa": str(folder / ("qa.jsonl" if d.mode == "weights" else "qatool.jsonl"))}
        if d.mode == "tool":
            eval_sets["qa_unseen"] = examples("qatool_unseen.jsonl")
            recall_sets["qa_unseen"] = str(folder / "qatool_unseen.jsonl")
        info = {"data_dir": str(folder), "recall_sets": recall_sets}
        return TaskData("facts", tokenizer.vocab_size, train, eval_sets, info, tokenizer)


@DATASETS.register("shakespeare")
class Shakespeare:
    @staticmethod
    def validate(config):
        if not 0 < config.data.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {config.data.val_fraction}.")

    @staticmethod
    def build(config, workdir) -> TaskData:
        from lmjax.data import shakespeare

        text = shakespeare.load_text()
        train_text, val_text = shakespeare.split_train_val(text, config.data.val_fraction)
        tokenizer = shakespeare.CharTokenizer.from_text(text)
        if tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"Shakespeare has {tokenizer.vocab_size} characters but model.vocab_size is "
                f"{config.model.vocab_size}; raise model.vocab_size."
            )
        seq_len = config.train.seq_len
        train = shakespeare.WindowSource(shakespeare.encode_to_array(train_text, tokenizer), seq_len)
        val = shakespeare.WindowSource(shakespeare.encode_to_array(val_text, tokenizer), seq_len)
        max_batches = config.eval.get("max_batches", 8)
        n_val = min(len(val), max_batches * config.eval.batch_size)
        val_examples = [val[i] for i in np.linspace(0, len(val) - 1, n_val).astype(int)]
        return TaskData("text", tokenizer.vocab_size, train, {"val": val_examples}, {"chars": tokenizer.vocab_size}, tokenizer)


@DATASETS.register("mqar")
class Mqar:
    """Multi-query associative recall (lmjax/data/mqar.py): fresh train and eval sequences by seed."""

    @staticmethod
    def validate(config):
        from lmjax.data.mqar import VARIANTS, num_slots, slots_needed

        d = config.data
        if d.variant not in VARIANTS:
            raise ConfigError(f"Unknown MQAR variant {d.variant!r} in data.variant; choose one of: {', '.join(VARIANTS)}.")
        for key in ("vocab_size", "seq_len", "num_kv_pairs", "num_train", "num_eval"):
            if not isinstance(d[key], int) or d[key] <= 0:
                raise ConfigError(f"data.{key} must be a positive integer, got {d[key]!r}.")
        if not d.power_a > 0:
            raise ConfigError(f"data.power_a must be positive, got {d.power_a!r}.")
        reassigned = d.get("num_reassigned", 0)
        if d.variant == "forgetting" and not 1 <= reassigned <= d.num_kv_pairs:
            raise ConfigError(
                f"data.num_reassigned={reassigned} must be between 1 and data.num_kv_pairs={d.num_kv_pairs} "
                f"in the forgetting variant."
            )
        needed = slots_needed(d.num_kv_pairs, d.variant, reassigned)
        if num_slots(d.seq_len, d.num_kv_pairs) < needed:
            raise ConfigError(
                f"data.seq_len={d.seq_len} is too short for {needed} queries/rebindings after "
                f"data.num_kv_pairs={d.num_kv_pairs} pairs; raise data.seq_len to at least {2 * d.num_kv_pairs + 2 * needed}."
            )
        if d.num_kv_pairs > d.vocab_size // 2 - 1 or needed > d.vocab_size - d.vocab_size // 2:
            raise ConfigError(
                f"data.vocab_size={d.vocab_size} has {d.vocab_size // 2 - 1} keys, too few for "
                f"data.num_kv_pairs={d.num_kv_pairs}; raise data.vocab_size."
            )
        if config.model.vocab_size != d.vocab_size:
            raise ConfigError(
                f"model.vocab_size={config.model.vocab_size} must equal data.vocab_size={d.vocab_size}."
            )
        if config.train.seq_len < d.seq_len:
            raise ConfigError(f"train.seq_len={config.train.seq_len} is below data.seq_len={d.seq_len}; raise train.seq_len.")

    @staticmethod
    def build(config, workdir) -> TaskData:
        from lmjax.data import mqar

        d = config.data
        sizes = dict(
            vocab_size=d.vocab_size, seq_len=d.seq_len, num_kv_pairs=d.num_kv_pairs, power_a=d.power_a,
            variant=d.variant, num_reassigned=d.get("num_reassigned", 0),
        )
        # Two independent streams of one seed: the eval sequences are not the training ones.
        train = mqar.MqarSource(mqar.generate(d.num_train, seed=[d.seed, 0], **sizes))
        evals = mqar.MqarSource(mqar.generate(d.num_eval, seed=[d.seed, 1], **sizes))
        return TaskData("mqar", d.vocab_size, train, {"mqar": [evals[i] for i in range(len(evals))]}, dict(sizes))


def build_task(config, workdir) -> TaskData:
    return DATASETS.get(config.data.name).build(config, workdir)
