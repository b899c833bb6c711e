"""SLURM job array for a grid: ROOT/slurm/commands.txt (one run a line) + ROOT/slurm/array.sbatch.

Task i runs line i+1 with `exec`, so SIGTERM from SLURM (preemption, or `--signal` before the time
limit) reaches lmjax.main, which saves a checkpoint; a requeued task reruns the same command and
resumes. Only runs not done when the script was written are listed: rerun the writer to list what
is left. Each task's output goes to ROOT/slurm/logs/<job>_<task>.log.

Runs with `eval.async_tasks` get their checkpoints evaluated by a second array, submitted beside
the first (no dependency): ROOT/slurm/eval_commands.txt + eval_array.sbatch, one
`python -m lmjax.eval.follow --until finished` per such run, on resources of its own, so evals
never take the trainer's accelerator. The training array then starts no follower itself
(LMJAX_EVAL_FOLLOWER=external); a follower task waits for its run's checkpoints, evaluates each,
and exits once the run has finished and every checkpoint is evaluated (a requeued training task
is waited for). Logs: ROOT/slurm/logs/eval_<job>_<task>.log; per run, WORKDIR/eval/follow.log.
"""
import shlex
import sys

from lmjax.grid.local import write_grid_json

EVAL_IDLE_TIMEOUT_S = 24 * 3600  # a follower whose run never finishes (it failed) gives up after this


def _array_script(path, title, commands, options):
    path.write_text(
        "#!/bin/bash\n"
        f"# {title} Submit: sbatch {path}\n"
        + "".join(f"#SBATCH {option}\n" for option in options)
        + "set -euo pipefail\n"
        + "".join(f"export {line}\n" for line in commands.get("export", ()))
        + f'LINE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(commands["file"]))})\n'
        'echo "lmjax.grid: task $SLURM_ARRAY_TASK_ID on $(hostname): $LINE"\n'
        'eval "exec $LINE"\n'
    )
    return path


def follower_command(run, python=None) -> list:
    """argv of the eval follower job of `run` (one with eval.async_tasks)."""
    return [python or (run.command[0] if run.command else sys.executable), "-m", "lmjax.eval.follow",
            "--workdir", str(run.workdir), "--tasks", run.async_eval, "--until", "finished",
            "--idle_timeout", str(EVAL_IDLE_TIMEOUT_S)]


def write_slurm(grid, runs, *, parallel=None, time=None, partition=None, gpus=0, cpus=None):
    """Write commands.txt and array.sbatch for `runs` (the ones not done), and for those with
    eval.async_tasks eval_commands.txt and eval_array.sbatch; returns the (training) sbatch path."""
    folder = grid.root / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    for run in runs:
        write_grid_json(grid, run)
    commands = folder / "commands.txt"
    commands.write_text("".join(shlex.join(run.command) + "\n" for run in runs))
    throttle = parallel or len(runs)
    resources = []
    if time:
        resources += [f"--time={time}", "--signal=B:TERM@120"]  # checkpoint 2 minutes before the limit
    if partition:
        resources.append(f"--partition={partition}")
    if gpus:
        resources.append(f"--gpus={gpus}")
    if cpus:
        resources.append(f"--cpus-per-task={cpus}")
    options = [
        f"--job-name=lmjax-{grid.name}",
        f"--array=0-{len(runs) - 1}%{throttle}",
        f"--output={folder / 'logs'}/%A_%a.log",
        "--open-mode=append",
        "--requeue",
        *resources,
    ]
    followed = [run for run in runs if run.async_eval]
    script = _array_script(
        folder / "array.sbatch", f"lmjax.grid {grid.name}: {len(runs)} runs, one per line of commands.txt.",
        {"file": commands, "export": ["LMJAX_EVAL_FOLLOWER=external"] if followed else []}, options,
    )
    eval_script = folder / "eval_array.sbatch"
    eval_script.unlink(missing_ok=True)  # from an earlier writing, which listed other runs
    (folder / "eval_commands.txt").unlink(missing_ok=True)
    if followed:
        eval_commands = folder / "eval_commands.txt"
        eval_commands.write_text("".join(shlex.join(follower_command(run)) + "\n" for run in followed))
        eval_options = [
            f"--job-name=lmjax-{grid.name}-eval",
            f"--array=0-{len(followed) - 1}%{min(throttle, len(followed))}",
            f"--output={folder / 'logs'}/eval_%A_%a.log",
            "--open-mode=append",
            "--requeue",
            *resources,
        ]
        _array_script(eval_script, f"lmjax.grid {grid.name}: the eval followers of {len(followed)} runs with "
                                   "eval.async_tasks, one per line of eval_commands.txt; beside array.sbatch.",
                      {"file": eval_commands}, eval_options)
    return script


def eval_script_of(script):
    """The eval followers' sbatch written beside the training `script`, or None."""
    path = script.parent / "eval_array.sbatch"
    return path if path.is_file() else None
