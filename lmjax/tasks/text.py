"""Text with a real model's tokenizer (lmjax/data/text.py): continued pretraining on documents
(the loss on every token), or fine-tuning on chats (`data.loss_mask=assistant`: the loss on the
assistant's tokens only; `all`: on every token). `eval/loss` on the held-out tail of the source.

The tokenizer is the one of the model the run starts from (`checkpoint.init_from`), so the task
takes it from the run builder instead of making its own.
"""
import dataclasses
from pathlib import Path

import numpy as np

from lmjax.registry import ConfigError

LOSS_MASKS = ("all", "assistant")
USES_PRETRAINED_TOKENIZER = True  # lmjax.config: checkpoint.init_from must be set, and names the tokenizer


@dataclasses.dataclass(frozen=True)
class Section:
    name: str = "text"
    source: str = "shakespeare"  # shakespeare | a .txt file | a .jsonl file of documents or chats
    loss_mask: str = "all"  # all | assistant (chats only)
    val_fraction: float = 0.05  # the tail of the documents (of their ids) or of the chats
    pack: bool = True
    input_shards: int = 0  # 0 = one per data-parallel process


def check(d: Section, *, vocab_size, seq_len, eval_cfg=None):
    from lmjax.data.text import SHAKESPEARE

    if d.loss_mask not in LOSS_MASKS:
        raise ConfigError(f"Unknown data.loss_mask {d.loss_mask!r}; choose one of: {', '.join(LOSS_MASKS)}.")
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}.")
    if d.source != SHAKESPEARE and not Path(d.source).is_file():
        raise ConfigError(f"data.source={d.source!r} is neither {SHAKESPEARE!r} nor an existing .txt or .jsonl file.")


def build(d: Section, *, workdir, seq_len, eval_cfg, vocab_size, tokenizer):
    from lmjax.data import text
    from lmjax.data.pipeline import check_lengths
    from lmjax.data.shakespeare import WindowSource
    from lmjax.eval.teacher_forced import TeacherForced, mean_loss
    from lmjax.tasks import TaskData

    try:
        corpus = text.read_source(d.source)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"The tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {vocab_size}.")
    if corpus.kind == "text":
        if d.loss_mask == "assistant":
            raise ConfigError(f"data.loss_mask=assistant needs chats, but {d.source!r} holds plain documents; use data.loss_mask=all.")
        train_ids, val_ids = text.split_ids(text.document_ids(corpus.items, tokenizer), d.val_fraction)
        train, val = WindowSource(train_ids, seq_len), WindowSource(val_ids, seq_len)
        if not len(train) or not len(val):
            raise ConfigError(f"{d.source!r} is too short for one training and one validation window of train.seq_len={seq_len} tokens.")
        n_val = min(len(val), eval_cfg.max_batches * eval_cfg.batch_size)
        val_examples = [val[i] for i in np.linspace(0, len(val) - 1, n_val).astype(int)]
    else:
        n_val = max(1, round(len(corpus.items) * d.val_fraction))
        if n_val >= len(corpus.items):
            raise ConfigError(f"{d.source!r} has {len(corpus.items)} chat(s): too few to hold out data.val_fraction={d.val_fraction} and train on the rest.")
        examples = text.chat_examples(corpus.items, tokenizer, d.loss_mask)
        train, val_examples = examples[:-n_val], examples[-n_val:]
        try:
            check_lengths(examples, seq_len, "chat")
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return TaskData(train, tokenizer, [TeacherForced({"val": val_examples}, mean_loss, batch_size=eval_cfg.batch_size)])
