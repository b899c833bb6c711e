"""python -m lmjax.grid GRID.py [--parallel K] [--root DIR] [--only TEXT] [--dry_run] [--retry_failed]
                              [--launcher local|slurm|multihost] [--slurm_* ...] [--hosts N]"""
import shlex
import sys

from lmjax.grid.local import failure_lines, run_local, runs_to_launch, selected_runs, summary_line
from lmjax.grid.multihost import write_multihost
from lmjax.grid.slurm import eval_script_of, write_slurm
from lmjax.grid.spec import GridError, load_grid
from lmjax.grid.status import run_status
from lmjax.grid.table import format_table
from lmjax import cli


def parse_args(argv):
    p = cli.ArgumentParser(prog="lmjax.grid", description="Run a grid of lmjax.main runs (see README, Grids).")
    p.add_argument("grid", help="grid file: a Python file whose get_grid() returns a dict")
    p.add_argument("--parallel", type=int, default=None, help="runs at a time (local: default 1; slurm: the array's %%K)")
    p.add_argument("--root", default=None, help="folder for the run folders (default: the grid's root)")
    p.add_argument("--only", default=None, help="only the runs whose name contains this text")
    p.add_argument("--dry_run", action="store_true", help="print the runs, their status and commands; start nothing")
    p.add_argument("--retry_failed", action="store_true", help="run failed runs again too (they resume)")
    p.add_argument("--launcher", choices=("local", "slurm", "multihost"), default="local")
    p.add_argument("--refresh", type=float, default=3.0, help="seconds between table refreshes on a terminal")
    p.add_argument("--slurm_time", default=None, help="#SBATCH --time, e.g. 24:00:00")
    p.add_argument("--slurm_partition", default=None)
    p.add_argument("--slurm_gpus", type=int, default=0, help="GPUs per run (default 0: none requested)")
    p.add_argument("--slurm_cpus", type=int, default=None, help="CPUs per run (#SBATCH --cpus-per-task)")
    p.add_argument("--hosts", type=int, default=None, help="multihost: processes (hosts) per run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return cli.run("lmjax.grid", parse_args, _grid, argv)


def _grid(args) -> int:
    if args.launcher == "multihost" and not args.hosts:
        raise GridError("--launcher multihost needs --hosts N.")
    for flag, value, least in (("--parallel", args.parallel, 1), ("--hosts", args.hosts, 1),
                               ("--slurm_cpus", args.slurm_cpus, 1), ("--slurm_gpus", args.slurm_gpus, 0)):
        if value is not None and value < least:
            raise GridError(f"{flag} must be at least {least}, got {value}.")
    if not args.refresh > 0:
        raise GridError(f"--refresh must be a positive number of seconds, got {args.refresh}.")
    grid = load_grid(args.grid, root=args.root)
    runs = selected_runs(grid, args.only)
    if not runs:
        raise GridError(f"no run name contains {args.only!r}; names look like {grid.runs[0].name!r}.")
    statuses = {r.name: run_status(r) for r in runs}
    todo = runs_to_launch(runs, statuses, args.retry_failed)
    if args.dry_run:
        print(format_table(grid.name, runs, statuses, 0.0))
        print(f"lmjax.grid: would launch {len(todo)} of {len(runs)} runs:")
        for r in todo:
            print("  " + shlex.join(r.command))
        return 0
    if args.launcher == "slurm":
        return _slurm(grid, runs, todo, args)
    if args.launcher == "multihost":
        script = write_multihost(grid, todo, hosts=args.hosts)
        print(f"lmjax.grid: wrote {script} ({len(todo)} runs, {args.hosts} hosts each). On every host:\n"
              f"  PROCESS_ID=<0..{args.hosts - 1}> COORDINATOR=<host0:port> bash {script}")
        return 0
    report = run_local(grid, parallel=args.parallel or 1, only=args.only, retry_failed=args.retry_failed,
                       refresh_s=args.refresh)
    print(summary_line(grid, report))
    for line in failure_lines(runs, report):
        print(line)
    if report.interrupted:
        print("lmjax.grid: interrupted; run the same command again to resume.")
        return 130
    return 1 if report.failed else 0


def _slurm(grid, runs, todo, args):
    if not todo:
        print(f"lmjax.grid: all {len(runs)} selected runs are done or failed; nothing to submit "
              f"(--retry_failed includes failed ones).")
        return 0
    script = write_slurm(grid, todo, parallel=args.parallel, time=args.slurm_time, partition=args.slurm_partition,
                         gpus=args.slurm_gpus, cpus=args.slurm_cpus)
    print(f"lmjax.grid: wrote {script.parent / 'commands.txt'} ({len(todo)} runs) and {script}. Submit with:\n"
          f"  sbatch {script}")
    eval_script = eval_script_of(script)
    if eval_script is not None:  # runs with eval.async_tasks: their evals are jobs of their own
        print(f"and their checkpoints' evaluations ({eval_script.parent / 'eval_commands.txt'}) beside it with:\n"
              f"  sbatch {eval_script}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
