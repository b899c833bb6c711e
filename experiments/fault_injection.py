"""Kill a training run again and again on one workdir; its end must equal an uninterrupted run's.

    python experiments/fault_injection.py [--kills 10] [--seed 0] [--out /tmp/lmjax_faults]

Trains a tiny facts run once without interruption (the reference), then starts the same command
on a second workdir and, `--kills` times in a row, stops it at a random moment: SIGKILL after a
random delay, SIGKILL the moment an asynchronous checkpoint is being written (orbax's temporary
step folder exists), or SIGTERM (lmjax saves and exits with 143). Then the run is left to
finish. Passes when the final parameters are bit-identical and every logged number except
timings equals the reference's. Prints one line per interruption and a verdict; exit status 1
on any difference.
"""
import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Timings differ from run to run by nature; everything else must not.
TIMED = ("train/tokens_per_s", "train/step_time_s", "perf/flops_per_s", "perf/mfu", "perf/flops_limit",
         "time/since_start_s", "time/recall_s")
OVERRIDES = {
    "data.num_people": 8, "data.num_unseen": 4, "model.dim": 32, "model.n_layers": 1, "model.n_heads": 2,
    "model.n_kv_heads": 1, "model.mlp_hidden": 64, "train.steps": 300, "train.batch_size": 4, "train.seq_len": 96,
    "train.log_every": 2, "train.eval_every": 10, "train.stop_when": "", "checkpoint.every": 5, "checkpoint.keep": 3,
    "checkpoint.async_save": True, "logging.progress_bar": False, "eval.recall": False, "optim.warmup_steps": 2,
}
MODES = ("sigkill at a random moment", "sigkill while a checkpoint is written", "sigterm")


def command(workdir):
    root = Path(__file__).resolve().parents[1]
    return [sys.executable, "-m", "lmjax.main", f"--config={root / 'configs' / 'facts.py'}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]


def writing_checkpoint(workdir) -> bool:
    folder = Path(workdir) / "checkpoints"
    return folder.is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in folder.iterdir())


def last_logged_step(workdir) -> int:
    path = Path(workdir) / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written (or torn by an earlier kill)
            pass
    return max(steps)


def interrupt(workdir, mode, rng, log, stride):
    """Start the run and stop it as `mode` says, some way into the steps it has left; returns
    what happened, in a few words."""
    started, first = time.time(), last_logged_step(workdir)
    target = first + rng.randint(1, stride)
    proc = subprocess.Popen(command(workdir), stdout=subprocess.DEVNULL, stderr=log)
    while proc.poll() is None and last_logged_step(workdir) < target:
        time.sleep(0.01)
    if mode == MODES[1]:
        while proc.poll() is None and not writing_checkpoint(workdir):
            time.sleep(0.001)
    else:
        time.sleep(rng.uniform(0.0, 0.2))
    if proc.poll() is not None:
        return f"finished first (status {proc.returncode})"
    proc.send_signal(signal.SIGTERM if mode == MODES[2] else signal.SIGKILL)
    status = proc.wait()
    return f"stopped near step {last_logged_step(workdir)} after {time.time() - started:.1f} s (status {status})"


def logged(workdir):
    values = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        values.update({(row["step"], k): v for k, v in row.items() if k != "step" and k not in TIMED})
    return values


def final_params(workdir):
    from lmjax.run_dir import restore_params

    _, _, params, step = restore_params(workdir)
    import jax

    return step, [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="experiments/fault_injection.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="interruptions before the run may finish")
    p.add_argument("--seed", type=int, default=0, help="seeds the modes and delays")
    p.add_argument("--out", default="/tmp/lmjax_faults")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} exists; pass another --out (the runs must start fresh).")
    out.mkdir(parents=True)
    rng = random.Random(args.seed)
    with open(out / "runs.log", "w") as log:
        subprocess.run(command(out / "reference"), check=True, stdout=subprocess.DEVNULL, stderr=log)
        for i in range(args.kills):
            mode = MODES[i % len(MODES)] if i < len(MODES) else rng.choice(MODES)
            what = interrupt(out / "faulty", mode, rng, log, stride=max(1, OVERRIDES["train.steps"] // (args.kills + 1)))
            print(f"interruption {i + 1}/{args.kills}: {mode}: {what}", flush=True)
        subprocess.run(command(out / "faulty"), check=True, stdout=subprocess.DEVNULL, stderr=log)
    (ref_step, ref), (step, got) = final_params(out / "reference"), final_params(out / "faulty")
    same_params = ref_step == step and len(ref) == len(got) and all(a.tobytes() == b.tobytes() for a, b in zip(ref, got))
    want, have = logged(out / "reference"), logged(out / "faulty")
    differing = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    print(f"final step {step} (reference {ref_step}); parameters {'bit-identical' if same_params else 'DIFFER'}; "
          f"{len(want)} logged values, {len(differing)} differ{': ' + str(differing[:5]) if differing else ''}")
    return 0 if same_params and not differing else 1


if __name__ == "__main__":
    sys.exit(main())
