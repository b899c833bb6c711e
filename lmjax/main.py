"""python -m lmjax.main --config=configs/facts.py [--config.a.b=v ...] [--workdir=DIR]"""
import sys
import time
from pathlib import Path

from lmjax.xla_flags import tune_xla_cpu_flags

tune_xla_cpu_flags()  # before anything imports jax

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lmjax.registry import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/facts.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; default: a fresh folder under runs/. Reusing one resumes.")


def _parse_flags(argv):
    """absl parsing, with misspelt --config.* keys reported in one line instead of a traceback."""
    from lmjax.config import check_override_keys, load_config_file

    config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_path is None:
        _fail(ConfigError("Missing --config=FILE (for example --config=configs/facts.py)."))
    if not Path(config_path.split(":")[0]).exists():
        _fail(ConfigError(f"Config file {config_path!r} does not exist."))
    try:
        check_override_keys(load_config_file(config_path.split(":")[0]), argv)
        return flags.FLAGS(argv)
    except (ConfigError, flags.Error) as error:
        _fail(error)


def _fail(error):
    """The lmjax.cli convention: one line, exit status 2."""
    from lmjax.cli import error_line

    print(error_line("lmjax", error), file=sys.stderr)
    sys.exit(2)


def _status(summary, config):
    if summary["interrupted"]:
        return "stopped at"
    if summary["stopped_early"]:
        return f"reached {config.train.stop_when} at"
    return "finished"


def default_workdir(config):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.data.name}-{stamp}"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    from lmjax.train.loop import train

    from lmjax.config import parse_config
    from lmjax.parallel.distributed import initialize, process_info

    try:
        config = parse_config(_CONFIG.value)
        workdir = Path(_WORKDIR.value) if _WORKDIR.value else default_workdir(config)
        # Before jax computes anything: a multi-host run joins here.
        info = process_info() if initialize(config.parallel.distributed) else None
        if info and info["process_index"] == 0:
            print(f"lmjax: {info['process_count']} processes, {info['device_count']} {info['platform']} devices "
                  f"({info['local_device_count']} per process)")
        summary = train(config, workdir)
    except ConfigError as error:  # a bad value; anything else is a bug and keeps its traceback
        _fail(error)
    shown = {k: v for k, v in summary.items() if k.startswith(("eval/", "train/loss"))}
    import jax

    if jax.process_index() == 0:  # one summary line per run
        print(
            f"lmjax: {_status(summary, config)} step {summary['step']} in "
            f"{summary['seconds_since_start']:.1f} s | "
            + " | ".join(f"{k} {v:.4f}" for k, v in shown.items())
            + f" | workdir {workdir}"
        )
    if summary["interrupted"]:
        sys.exit(143)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
