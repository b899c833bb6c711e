"""Tasks by name (`data.name`): each brings its data section, its examples and its evaluators.

A task module defines `Section` (the frozen dataclass of its `data` keys, defaults included),
`check(section, *, vocab_size, seq_len)` (ConfigError for a bad combination, before anything is
built) and `build(section, *, workdir, seq_len, eval_cfg, vocab_size) -> TaskData`. A new task is
a new file here plus a line below.
"""
import dataclasses
from typing import Any, Sequence

from lmjax.registry import Registry

TASKS = Registry("data.name")


@dataclasses.dataclass
class TaskData:
    train: Sequence[dict]  # training examples (inputs, targets, loss_mask, ...)
    tokenizer: Any  # None: the examples are plain ids (MQAR)
    evaluators: list  # lmjax.eval evaluators, in the order their metrics are logged


def _register():
    from lmjax.tasks import facts, mqar, shakespeare, text

    for module in (facts, mqar, shakespeare, text):
        TASKS.register(module.Section.name)(module)


_register()
