"""What the training probes cost: the facts recipe's train step with and without `probe/...`.

    python experiments/bench_probes.py [--config configs/facts.py] [--steps 40] [--rounds 5]

With `logging.probes_every > 0` every step computes the probes (per-layer activation RMS,
per-parameter weight norms and update ratios) and the loop fetches them every N steps, so the
cost is the extra work inside each step. Both steps run interleaved in rounds (this machine is
shared; interleaving cancels drifts), medians over all steps; prints each side and the ratio.
"""
import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # XLA:CPU runtime choices must precede the jax import
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmjax.xla_flags import tune_xla_cpu_flags

    tune_xla_cpu_flags()

import jax
import numpy as np

from lmjax.config import load_config_file, parse_config
from lmjax.data.pipeline import InputShards
from lmjax.models import build_model
from lmjax.tasks import TASKS
from lmjax.optim.optimizer import make_optimizer
from lmjax.train.state import init_state_fn
from lmjax.train.step import make_train_step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/facts.py")
    p.add_argument("--steps", type=int, default=40, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workdir", default="/tmp/lmjax_bench_probes")
    args = p.parse_args()
    config = parse_config(load_config_file(args.config))
    t = config.train
    task = TASKS.get(config.data.name).build(
        config.data, workdir=Path(args.workdir), seq_len=t.seq_len, eval_cfg=config.eval, vocab_size=config.model.vocab_size
    )
    batches = InputShards(task.train, seq_len=t.seq_len, batch_size=t.batch_size, seed=config.seed,
                          pack=config.data.pack, shards=1, rows=(0, t.batch_size))
    batch = next(iter(batches))
    model = build_model(config.model)
    tx, schedule = make_optimizer(config.optim, t.steps)
    init = jax.jit(init_state_fn(model, tx, t.seq_len))
    sides = {}
    for name, probes in (("no probes", False), ("probes", True)):
        step = make_train_step(model.apply, tx, schedule, config.optim.grad_accum, probes=probes)
        state = init(jax.random.PRNGKey(0))
        state, metrics = step(state, batch)  # compile
        jax.block_until_ready(metrics)
        sides[name] = {"step": step, "state": state, "times": []}
    for _ in range(args.rounds):
        for side in sides.values():
            for _ in range(args.steps):
                start = time.perf_counter()
                side["state"], metrics = side["step"](side["state"], batch)
                jax.block_until_ready(metrics)
                side["times"].append(time.perf_counter() - start)
    base = float(np.median(sides["no probes"]["times"]))
    n_probes = sum(k.startswith("probe/") for k in metrics)
    print(f"{args.config}: batch {t.batch_size}x{t.seq_len}, {jax.devices()[0].device_kind}, "
          f"{args.rounds}x{args.steps} steps per side, {n_probes} probe values")
    for name, side in sides.items():
        median = float(np.median(side["times"]))
        print(f"  {name:10s} {median * 1e3:7.1f} ms/step   x{median / base:.3f}")
    overhead = float(np.median(sides["probes"]["times"])) / base - 1
    print(f"probe overhead: {overhead * 100:+.1f}% of the step")


if __name__ == "__main__":
    main()
