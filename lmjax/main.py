"""python -m lmjax.main --config=configs/facts.py [--config.a.b=v ...] [--workdir=DIR]

Exit status: 0 trained (or stopped by train.stop_when); 2 a bad config value (or an unreadable
line inside WORKDIR/metrics.jsonl); 3 diverged: a non-finite loss, gradient norm or state, with
no checkpoint saved after it; 4 the run could not write its files (an unwritable workdir, a full
disk); 143 stopped by SIGTERM or Ctrl-C after saving a checkpoint. Each failure is one line
`lmjax: error: ...` on stderr; anything else is a bug and keeps its traceback.
"""
import logging as std_logging
import sys
import time
import traceback
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


BAD_CONFIG, DIVERGED, CANNOT_WRITE, STOPPED = 2, 3, 4, 143  # exit statuses


def _fail(error, status=BAD_CONFIG):
    """The lmjax.cli convention: one line, exit status 2 (or the status given)."""
    from lmjax.cli import error_line

    print(error_line("lmjax", error), file=sys.stderr)
    sys.exit(status)


def _status(summary, config):
    if summary["interrupted"]:
        return "stopped at"
    if summary["stopped_early"]:
        return f"reached {config.train.stop_when} at"
    return "finished"


def default_workdir(config):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.data.name}-{stamp}"


class _WriteFailuresReportedOnce:
    """A filter for absl's and asyncio's loggers: orbax logs a failed checkpoint write with its
    traceback from each of its threads (and asyncio, from a write task nobody awaits any more),
    then the training loop raises it and reports it in one line."""

    def __init__(self, source=""):
        self.source = source

    def filter(self, record):
        from lmjax.train.actions import write_failure

        error = record.exc_info[1] if record.exc_info else None
        return not (self.source in record.pathname and error is not None and write_failure(error) is not None)


def _late_write_callbacks_ignored(unraisable, default=sys.unraisablehook):
    """When one write of a checkpoint fails, orbax stops waiting and closes its event loop while
    tensorstore still finishes the other writes; each of their completion callbacks then meets
    the closed loop ('Event loop is closed', an unraisable error Python would print with its
    traceback). The failure itself is reported in one line; anything else goes to `default`."""
    error, frames = unraisable.exc_value, traceback.extract_tb(unraisable.exc_traceback)
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
            and any(frame.name == "call_soon_threadsafe" for frame in frames)):
        default(unraisable)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    logging.get_absl_logger().addFilter(_WriteFailuresReportedOnce("orbax"))
    std_logging.getLogger("asyncio").addFilter(_WriteFailuresReportedOnce())
    sys.unraisablehook = _late_write_callbacks_ignored
    from lmjax.config import parse_config
    from lmjax.extras import MissingExtra
    from lmjax.monitor.metrics import MetricsFileError
    from lmjax.parallel.distributed import initialize, process_info
    from lmjax.run_dir import CheckpointError
    from lmjax.train.actions import Diverged
    from lmjax.train.loop import train

    try:
        config = parse_config(_CONFIG.value)
        workdir = Path(_WORKDIR.value) if _WORKDIR.value else default_workdir(config)
        # Before jax computes anything: a multi-host run joins here.
        info = process_info() if initialize(config.parallel.distributed) else None
        if info and info["process_index"] == 0:
            print(f"lmjax: {info['process_count']} processes, {info['device_count']} {info['platform']} devices "
                  f"({info['local_device_count']} per process)")
        summary = train(config, workdir)
    except (ConfigError, MetricsFileError, CheckpointError, MissingExtra) as error:  # a bad value or file, a missing extra; anything else is a bug
        _fail(error)
    except Diverged as error:
        _fail(error, DIVERGED)
    except OSError as error:  # CannotWrite names the file; other OSErrors (a full disk...) carry theirs
        _fail(error, CANNOT_WRITE)
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
        sys.exit(STOPPED)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
