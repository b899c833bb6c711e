"""Evaluators: what a task measures, run by the training loop or on a saved run.

An evaluator has `at_end` (False: every `train.eval_every` steps; True: once, after training),
`metric_names()` (what it reports: `train.stop_when` is checked against them before training),
`prepare(env)` (compile against the run's model and layout, once) and `__call__(params) ->
{metric name: value}`. Tasks (lmjax/tasks/) choose and configure them; nothing here names a task.
"""
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class EvalEnv:
    model: Any  # the flax module
    layout: Any = None  # lmjax.parallel.layout.Layout: evaluate on its mesh (params laid out on it)
    param_shardings: Any = None
    progress: bool = False  # progress bars for long evaluations
