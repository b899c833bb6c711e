"""Evaluation. Two layers:

* Tasks on any checkpoint (`python -m lmjax.eval`, lmjax.eval.tasks): requests of three kinds
  (requests.py) answered by a `RequestEvaluator` (evaluator.py), results written by record.py;
  asynchronously during training by follow.py; in the lm-evaluation-harness by harness.py.
* The trainer's evaluators, which the training tasks (lmjax/tasks/) choose. An evaluator has
  `at_end` (False: every `train.eval_every` steps; True: once, after training), `metric_names()`
  (what it reports: `train.stop_when` is checked against them before training), `prepare(env)`
  (compile against the run's model and layout, once) and `__call__(params) -> {metric name:
  value}`. Nothing here names a task.
"""
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class EvalEnv:
    model: Any  # the flax module
    layout: Any = None  # lmjax.parallel.layout.Layout: evaluate on its mesh (params laid out on it)
    param_shardings: Any = None
    progress: bool = False  # progress bars for long evaluations
