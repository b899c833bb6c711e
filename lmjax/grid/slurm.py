"""SLURM job array for a grid: ROOT/slurm/commands.txt (one run a line) + ROOT/slurm/array.sbatch.

Task i runs line i+1 with `exec`, so SIGTERM from SLURM (preemption, or `--signal` before the time
limit) reaches lmjax.main, which saves a checkpoint; a requeued task reruns the same command and
resumes. Only runs not done when the script was written are listed: rerun the writer to list what
is left. Each task's output goes to ROOT/slurm/logs/<job>_<task>.log.
"""
import shlex

from lmjax.grid.local import write_grid_json


def write_slurm(grid, runs, *, parallel=None, time=None, partition=None, gpus=0, cpus=None):
    """Write commands.txt and array.sbatch for `runs` (the ones not done); returns the sbatch path."""
    folder = grid.root / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    for run in runs:
        write_grid_json(grid, run)
    commands = folder / "commands.txt"
    commands.write_text("".join(shlex.join(run.command) + "\n" for run in runs))
    throttle = parallel or len(runs)
    options = [
        f"--job-name=lmjax-{grid.name}",
        f"--array=0-{len(runs) - 1}%{throttle}",
        f"--output={folder / 'logs'}/%A_%a.log",
        "--open-mode=append",
        "--requeue",
    ]
    if time:
        options += [f"--time={time}", "--signal=B:TERM@120"]  # checkpoint 2 minutes before the limit
    if partition:
        options.append(f"--partition={partition}")
    if gpus:
        options.append(f"--gpus={gpus}")
    if cpus:
        options.append(f"--cpus-per-task={cpus}")
    script = folder / "array.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"# lmjax.grid {grid.name}: {len(runs)} runs, one per line of commands.txt. Submit: sbatch {script}\n"
        + "".join(f"#SBATCH {option}\n" for option in options)
        + "set -euo pipefail\n"
        f'LINE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(commands))})\n'
        'echo "lmjax.grid: task $SLURM_ARRAY_TASK_ID on $(hostname): $LINE"\n'
        'eval "exec $LINE"\n'
    )
    return script
