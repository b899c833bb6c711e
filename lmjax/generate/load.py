"""Load a trained run (config, model, parameters, task) from its workdir for generation."""
from lmjax.data.datasets import build_task
from lmjax.train.restore import restore_params


def load_run(workdir, step=None, layout=None):
    """(config, model, params, task) at checkpoint `step` (default: the latest); the parameters
    on the first device, or sharded on `layout`'s mesh (whatever mesh the run trained on)."""
    config, model, params, _ = restore_params(workdir, step, layout)
    return config, model, params, build_task(config, workdir)
