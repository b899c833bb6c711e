"""Load a trained run (config, model, parameters, task) from its workdir for generation."""
from lmjax.run_dir import restore_params, run_task


def load_run(workdir, step=None, layout=None):
    """(config, model, params, task) at checkpoint `step` (default: the newest intact one; a damaged
    `step` is a one-line ValueError, see lmjax.run_dir.checkpoint_damage); the parameters
    on the first device, or sharded on `layout`'s mesh (whatever mesh the run trained on).
    `task` is a `lmjax.run_dir.RunTask` (tokenizer, facts data folder): the dataset is not built."""
    config, model, params, _ = restore_params(workdir, step, layout)
    return config, model, params, run_task(config, workdir)
