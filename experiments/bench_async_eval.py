"""What asynchronous evaluation costs the trainer: the train step time with and without
`eval.async_tasks` (lmjax.eval.follow evaluating every checkpoint in a process of its own).

    python experiments/bench_async_eval.py [--steps 120] [--rounds 2] [--every 20] [--eval cli|standin]

Each side is one `python -m lmjax.main` of the facts recipe (no stop_when, no in-process evals,
a checkpoint every `--every` steps): without async eval, with it at the trainer's own priority
(nice 0, the follower's default), and with the evals at nice 10. The sides run
interleaved in rounds (this machine is shared; interleaving cancels drifts), each async side
waiting for its last evals before the next side starts (outside its timing). A side's figure is
the median `train/step_time_s` of its log windows, the first (compilation) left out; also the
share of the training time an eval was running (`busy`, from each eval's seconds). `--eval cli`
evaluates with `python -m lmjax.eval --tasks TASKS`; `standin` (while the CLI is missing, or to
isolate the mechanism) is a JAX process that multiplies matrices for `--standin_s` seconds, then
writes its results as the CLI does.

Measured (2 CPUs, Intel(R) Xeon(R) Processor, shared; 120 steps, a checkpoint every 40, facts_recall
evals of ~25-35 s each, so an eval runs during nearly all of training):
    off               457.0 ms/step  x1.00
    async, nice 10    539.2 ms/step  x1.18
    async, nice 0     495.9 ms/step  x1.09
(the stand-in eval, 60 steps, 1 round: x1.20 at nice 10, x1.06 at nice 0).
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmjax.eval import follow  # noqa: E402  (imports no JAX)

STANDIN = r'''
import json, os, sys, time
from pathlib import Path
import jax, jax.numpy as jnp
workdir, step, seconds = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
start = time.time()
x = jnp.ones((512, 512), jnp.float32)
f = jax.jit(lambda x: jnp.tanh(x @ x) * 0.5)
while time.time() - start < seconds:
    x = f(x).block_until_ready()
out = workdir / "eval" / str(step)
out.mkdir(parents=True, exist_ok=True)
(out / ".r.tmp").write_text(json.dumps({"step": step, "tasks": ["standin"], "metrics": {"eval/standin": 1.0}, "seconds": time.time() - start}))
os.replace(out / ".r.tmp", out / "results.json")
with open(workdir / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": step, "eval/standin": 1.0}) + "\n")
'''


def train_side(workdir, args, async_tasks, nice, env):
    overrides = {
        "train.steps": args.steps, "train.stop_when": "", "train.log_every": args.log_every,
        "train.eval_every": 10 * args.steps, "eval.recall": False, "checkpoint.every": args.every,
        "checkpoint.keep": 2, "logging.progress_bar": False, "eval.async_tasks": async_tasks,
    }
    command = [sys.executable, "-m", "lmjax.main", f"--config={ROOT / 'configs' / 'facts.py'}",
               *(f"--config.{k}={v}" for k, v in overrides.items()), f"--workdir={workdir}"]
    side_env = dict(env, **{follow.NICE_ENV: str(nice)})
    start = time.time()
    subprocess.run(command, env=side_env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    trained_s = time.time() - start
    statuses = follow.wait(workdir, timeout=3600) if async_tasks else {}
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    times = [row["train/step_time_s"] for row in rows if "train/step_time_s" in row][1:]
    busy = sum(json.loads((workdir / "eval" / str(s) / "results.json").read_text())["seconds"]
               for s, status in statuses.items() if status == "done")
    return {"times": times, "trained_s": trained_s, "evals": sum(v == "done" for v in statuses.values()), "busy_s": busy}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--every", type=int, default=20, help="checkpoint.every: an eval per checkpoint")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--eval", choices=("cli", "standin"), default="cli" if (ROOT / "lmjax" / "eval" / "__main__.py").exists() else "standin")
    p.add_argument("--tasks", default="facts_recall", help="eval.async_tasks (--eval cli)")
    p.add_argument("--standin_s", type=float, default=3.0, help="seconds of work per stand-in eval")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="lmjax_bench_async_eval_"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop(follow.COMMAND_ENV, None)
    if args.eval == "standin":
        script = root / "standin_eval.py"
        root.mkdir(parents=True, exist_ok=True)
        script.write_text(STANDIN)
        env[follow.COMMAND_ENV] = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{workdir}} {{step}} {args.standin_s}"
    sides = {"off": ("", 0), "async, nice 0": (args.tasks, 0), "async, nice 10": (args.tasks, 10)}
    results = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, (tasks, nice) in sides.items():
            results[name].append(train_side(root / f"{r}-{name.replace(', ', '-').replace(' ', '')}", args, tasks, nice, env))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"facts recipe, {args.steps} steps, a checkpoint every {args.every}, evals: {args.eval}"
          f"{' ' + args.tasks if args.eval == 'cli' else f' ({args.standin_s:.0f} s of matmuls)'}; "
          f"{os.cpu_count()} CPUs ({cpu}); median step time of {args.rounds} interleaved rounds")
    base = statistics.median(t for run in results["off"] for t in run["times"])
    for name, runs in results.items():
        median = statistics.median(t for run in runs for t in run["times"])
        trained = statistics.median(run["trained_s"] for run in runs)
        busy = sum(run["busy_s"] for run in runs) / sum(run["trained_s"] for run in runs)
        evals = sum(run["evals"] for run in runs) / len(runs)
        print(f"{name:15s} {median * 1e3:7.1f} ms/step  x{median / base:.2f}  (run {trained:5.1f} s, "
              f"{evals:.0f} evals a run, eval busy {busy:4.0%} of the run time)")


if __name__ == "__main__":
    main()
