"""A training run's parameters from its workdir: the one restore path for generation and export."""
import json
from pathlib import Path

from ml_collections import config_dict

from lmjax.models import build_model
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.optimizer import make_optimizer
from lmjax.train.state import abstract_train_state, init_state_fn, state_shardings


def read_run_config(workdir):
    workdir = Path(workdir)
    if not (workdir / "config.json").is_file():
        raise ValueError(f"{str(workdir)!r} has no config.json; point --workdir at a training run folder.")
    return config_dict.ConfigDict(json.loads((workdir / "config.json").read_text()))


def restore_params(workdir, step=None, layout=None):
    """(config, model, params, step) at checkpoint `step` (default: the latest); the parameters
    on the first device, or sharded on `layout`'s mesh (whatever mesh the run trained on)."""
    workdir = Path(workdir)
    config = read_run_config(workdir)
    no_checkpoint = f"{str(workdir)!r} has no checkpoint yet; train first (python -m lmjax.main ...)."
    if not (workdir / "checkpoints").is_dir():  # checked first: the manager would create the folder
        raise ValueError(no_checkpoint)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, async_save=False)
    try:
        steps = sorted(checkpointer.manager.all_steps())
        if not steps:
            raise ValueError(no_checkpoint)
        if step is not None and step not in steps:
            raise ValueError(f"No checkpoint at step {step} in {str(workdir)!r}; saved steps: {', '.join(map(str, steps))}.")
        step = steps[-1] if step is None else step
        model = build_model(config)
        tx, _ = make_optimizer(config.optim, config.train.steps)
        seq_len = config.train.seq_len
        shardings = state_shardings(model, tx, seq_len, layout) if layout is not None else None
        abstract = abstract_train_state(init_state_fn(model, tx, seq_len), config.seed, shardings)
        state, _ = checkpointer.restore(abstract, step, data=False)
    finally:
        checkpointer.close()
    return config, model, state.params, step
