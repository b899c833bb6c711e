"""K training runs of one model shape as ONE jitted program (jax.vmap over K train states) vs the
same K runs stepped one after another: tokens/s per run, and whether the results are the same.

    taskset -c 1 python experiments/bench_vmap_seeds.py [--steps 5 --repeats 5]

Facts-study settings: vocab 260, seq_len 448, 16 rows, attention blocks of 64, unrolled layers,
mlp_hidden 4*dim, AdamW as configs/facts.py; random tokens packed as ~3 segments of ~140 tokens
a row. Run k has seed k and its own random batches. For each shape and K it prints the parameter
count, the median seconds per iteration (all K runs one step each) both ways, the ratio of tokens/s
per run (vmapped / sequential, > 1: vmap is faster) and its range over the timed iterations; and,
both ways starting from the same initial states and fed the same batches, whether after --steps
steps every vmapped run's parameters and losses are bit-identical to the same run stepped alone
(else the max abs difference). Both ways run one pass: the first --warmup iterations (compiling)
are untimed, the next --repeats are timed.
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
import jax.numpy as jnp
import numpy as np

from lmjax.config import Optim
from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.optim.optimizer import make_optimizer
from lmjax.train.state import init_state_fn
from lmjax.train.step import make_train_step

VOCAB, SEQ_LEN, ROWS = 260, 448, 16
SHAPES = [(1, 32, 2), (2, 24, 2), (4, 16, 4)]  # (n_layers, dim, n_heads)
KS = (2, 4)


def packed_batch(rng):
    """Random tokens in rows of ~3 segments of ~140 tokens; the rest of a row is padding (segment 0)."""
    tokens = rng.integers(0, VOCAB, (ROWS, SEQ_LEN + 1)).astype(np.int32)
    segment_ids = np.zeros((ROWS, SEQ_LEN), np.int32)
    positions = np.zeros((ROWS, SEQ_LEN), np.int32)
    for row in range(ROWS):
        start = 0
        for segment in (1, 2, 3):
            length = min(int(rng.integers(120, 161)), SEQ_LEN - start)
            segment_ids[row, start:start + length] = segment
            positions[row, start:start + length] = np.arange(length)
            start += length
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": (segment_ids > 0).astype(np.int32),
            "segment_ids": segment_ids, "positions": positions}


def stack(trees):
    return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def unstack(tree, k):
    return jax.tree.map(lambda x: x[k], tree)


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def bench(n_layers, dim, n_heads, ks, steps, repeats, warmup):
    model = Transformer(TransformerConfig(
        vocab_size=VOCAB, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, mlp_hidden=4 * dim,
        scan_layers=False, attention_block=64,
    ))
    tx, schedule = make_optimizer(Optim(), 3000)  # the facts recipe's AdamW and cosine schedule
    init = jax.jit(init_state_fn(model, tx, SEQ_LEN))
    step = make_train_step(model.apply, tx, schedule)  # jitted, state donated
    vstep = jax.jit(jax.vmap(step), donate_argnums=0)
    n_params = sum(x.size for x in jax.tree.leaves(init(jax.random.PRNGKey(0)).params))
    rng = np.random.default_rng(0)
    # One pass both times and checks: `steps` steps feed the exactness check, the iterations
    # after `warmup` (the first compiles) are timed; run k's batch at step s is batches[s][k].
    n_iters = max(steps, warmup + repeats)
    batches = [[packed_batch(rng) for _ in range(max(ks))] for _ in range(n_iters)]
    for K in ks:
        alone = [init(jax.random.PRNGKey(seed)) for seed in range(K)]
        together = stack([init(jax.random.PRNGKey(seed)) for seed in range(K)])
        stacked_batches = [stack(b[:K]) for b in batches]
        seq_times, vmap_times, losses_alone, losses_together = [], [], [], []

        def sequential(i):
            metrics = []
            for k in range(K):
                alone[k], m = step(alone[k], batches[i][k])
                metrics.append(m)
            return metrics

        def vmapped(i):
            nonlocal together
            together, m = vstep(together, stacked_batches[i])
            return m

        for i in range(n_iters):
            # Alternating, so that load from other processes on the core hits both ways alike.
            t_seq, m_seq = timed(lambda: sequential(i))
            t_vmap, m_vmap = timed(lambda: vmapped(i))
            if i >= warmup:
                seq_times.append(t_seq)
                vmap_times.append(t_vmap)
            if i < steps:
                losses_alone.append([np.asarray(m["train/loss"]) for m in m_seq])
                losses_together.append(np.asarray(m_vmap["train/loss"]))
            if i == steps - 1:  # host copies: the next steps donate these buffers
                params_alone = [jax.tree.map(np.array, state.params) for state in alone]
                params_together = jax.tree.map(np.array, together.params)
        t_seq, t_vmap = float(np.median(seq_times)), float(np.median(vmap_times))
        pair_ratios = np.array(seq_times) / np.array(vmap_times)  # adjacent in time: the noise level

        identical, max_diff = True, 0.0
        for k in range(K):
            for a, b in zip(jax.tree.leaves(params_alone[k]), jax.tree.leaves(unstack(params_together, k))):
                identical &= np.array_equal(a, b)
                max_diff = max(max_diff, float(np.max(np.abs(a - b))))
        la, lt = np.array(losses_alone), np.array(losses_together)
        loss_note = "losses bit-identical" if np.array_equal(la, lt) else f"losses max |diff| {np.max(np.abs(la - lt)):.2e}"
        param_note = "params bit-identical" if identical else f"params max |diff| {max_diff:.2e}"
        print(f"layers={n_layers} dim={dim} heads={n_heads} params={n_params:,} K={K}: "
              f"sequential {t_seq:.4f} s/iter, vmapped {t_vmap:.4f} s/iter, "
              f"tokens/s per run vmapped/sequential {t_seq / t_vmap:.2f}x "
              f"(iterations {pair_ratios.min():.2f}-{pair_ratios.max():.2f}) | after {steps} steps: "
              f"{param_note}, {loss_note}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="steps of the exactness check")
    p.add_argument("--repeats", type=int, default=5, help="timed iterations each way (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first iterations each way (compile)")
    args = p.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; vocab {VOCAB}, seq_len {SEQ_LEN}, "
          f"{ROWS} rows, ~3 segments of ~140 tokens a row")
    for shape in SHAPES:
        bench(*shape, KS, args.steps, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
