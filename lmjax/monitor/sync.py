"""Replay runs' local history into wandb after the fact.

    python -m lmjax.monitor.sync WORKDIR [WORKDIR...] [--mode offline|online] [--project P] [--entity E]

A WORKDIR is a run folder (config.json + metrics.jsonl) or any folder above run folders (a grid's
root): every run folder under it is synced. Each run becomes the wandb run whose id is in
WORKDIR/wandb_id (written here if missing), so a run that logged to wandb while it trained and is
synced later stays one run. config.json is the run's config; each metrics.jsonl step is one
history row (lines with the same step are merged, "nan"/"inf" strings are logged as floats).

The run is started without `resume`, as `wandb sync` replays a run: the replayed history replaces
what the run held (wandb's `resume="allow"` would instead drop every step below the run's last).
Offline, each run is written to WORKDIR/wandb_sync/wandb/offline-run-<time>-<id> (the previous
folder for that id is replaced), ready for `wandb sync`.
"""
import json
import shlex
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from lmjax import cli
from lmjax.monitor.metrics import wandb_run_id

PROG = "lmjax.monitor.sync"


class SyncError(ValueError):
    """A user error: printed as one line, exit status 2."""


def is_run_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "metrics.jsonl").is_file()


def find_runs(paths) -> list[Path]:
    """Run folders named by `paths`, each a run folder or a folder searched recursively for them."""
    runs = []
    for path in map(Path, paths):
        if not path.exists():
            raise SyncError(f"{path} does not exist.")
        if not path.is_dir():
            raise SyncError(f"{path} is not a folder; pass a run folder (config.json + metrics.jsonl) or a folder of runs.")
        if is_run_folder(path):
            runs.append(path)
            continue
        if (path / "config.json").is_file():
            raise SyncError(f"{path} has config.json but no metrics.jsonl; has the run logged anything yet?")
        found = sorted(c.parent for c in path.rglob("config.json") if is_run_folder(c.parent))
        if not found:
            raise SyncError(f"{path} holds no run folders (folders with config.json and metrics.jsonl).")
        runs.extend(found)
    return list(dict.fromkeys(run.resolve() for run in runs))  # each run once, in order


def _number(value):
    """A metrics.jsonl value as a float; None for what is not a number (skipped)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)  # "nan", "inf", "-inf": how MetricWriter writes non-finite values
    except ValueError:
        return None


def read_history(metrics_path: Path) -> list[tuple[int, dict]]:
    """metrics.jsonl as [(step, {name: float})], one entry per step, steps ascending."""
    rows = {}
    for number, line in enumerate(metrics_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise SyncError(f"{metrics_path}:{number} is not a JSON object with a \"step\": {line[:80]!r}") from None
        merged = rows.setdefault(step, {})
        for name, value in row.items():
            if (value := _number(value)) is not None:
                merged[name] = value
    return sorted(rows.items())


def read_config(run: Path) -> dict:
    try:
        return json.loads((run / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise SyncError(f"{run / 'config.json'} is not valid JSON ({e}).") from None


def sync_run(run: Path, *, mode: str, project: str | None = None, entity: str | None = None):
    """Replay one run folder into its wandb run; returns the wandb Run (finished, its files written
    once `wandb.teardown()` returns)."""
    import wandb

    config = read_config(run)
    history = read_history(run / "metrics.jsonl")
    w = config.get("logging", {}).get("wandb", {})
    run_id, _ = wandb_run_id(run)
    root = run / "wandb_sync"
    if mode == "offline":  # one folder per run id: `wandb sync` of two would keep only one's history
        for old in (root / "wandb").glob(f"offline-run-*-{run_id}"):
            shutil.rmtree(old)
    root.mkdir(exist_ok=True)
    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True, x_save_requirements=False)
    try:
        wb = wandb.init(
            project=project or w.get("project") or "lmjax", entity=entity or w.get("entity") or None,
            name=w.get("name") or run.name, id=run_id, mode=mode, dir=str(root), config=config,
            reinit="create_new", settings=settings,
        )
    except wandb.errors.Error as e:
        raise SyncError(f"wandb could not start a run for {run}: {e}") from None
    try:
        for step, values in history:
            wb.log(values, step=step)
    finally:
        wb.finish()
    if history:  # a later resume of this workdir must not send these steps again (see WandbRun)
        step_file = run / "wandb_step"
        sent = int(step_file.read_text()) if step_file.exists() else -1
        step_file.write_text(str(max(sent, history[-1][0])))
    return wb


def parse_args(argv):
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run folders or folders holding runs")
    parser.add_argument("--mode", choices=("offline", "online"), default="offline",
                        help="offline: write wandb files to upload later with `wandb sync` (default); online: upload now")
    parser.add_argument("--project", help="wandb project (default: config.logging.wandb.project)")
    parser.add_argument("--entity", help="wandb entity (default: config.logging.wandb.entity, else your default)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return cli.run(PROG, parse_args, _sync, argv)


def _sync(args) -> int:
    try:
        runs = find_runs(args.workdirs)
        for run in runs:  # check every run before writing anything
            read_config(run)
            read_history(run / "metrics.jsonl")
        synced = []
        for run in tqdm(runs, desc="wandb sync", unit="run"):
            synced.append(sync_run(run, mode=args.mode, project=args.project, entity=args.entity))
    finally:
        if "wandb" in sys.modules:  # run.finish() returns before wandb's service has written every file
            sys.modules["wandb"].teardown()
    if args.mode == "offline":
        folders = [wb.settings.sync_dir for wb in synced]
        print(f"Wrote {len(folders)} offline wandb run{'s' * (len(folders) != 1)}:")
        print("\n".join(f"  {folder}" for folder in folders))
        print("Upload them with:\n  wandb sync " + " ".join(shlex.quote(str(f)) for f in folders))
    else:
        for run, wb in zip(runs, synced):
            print(f"{run} -> {wb.url}")


if __name__ == "__main__":
    sys.exit(main())
