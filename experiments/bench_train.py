"""lmjax vs a plain PyTorch reference (HF LlamaForCausalLM + torch AdamW), same shapes, one run.

    python experiments/bench_train.py [--dim 256 --n_layers 4 --n_heads 4 --seq_len 256 --batch 8]

Prints, one line each: tokens/s of both, the ratio, and each one's FLOP/s as a fraction of this
machine's measured f32 matmul rate (FLOPs from the same analytic formula for both sides).
torch comes from the `test` extra (torch==2.13.0, CPU); it is never an lmjax dependency.
"""
import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # XLA:CPU runtime choices must precede the jax import
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmjax.xla_flags import tune_xla_cpu_flags

    tune_xla_cpu_flags()

import jax
import numpy as np

from bench_train_torch import llama_train_flops_per_token, torch_reference_tokens_per_s
from lmjax.config import Optim
from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.monitor.hardware import measure_matmul_flops
from lmjax.optim.optimizer import make_optimizer
from lmjax.train.state import init_state_fn
from lmjax.train.step import make_train_step


def lmjax_tokens_per_s(dim, n_layers, n_heads, n_kv_heads, mlp_hidden, vocab, seq_len, batch, steps, warmup,
                       scan_layers=True, attention_block=0):
    model = Transformer(TransformerConfig(
        vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        mlp_hidden=mlp_hidden, scan_layers=scan_layers, attention_block=attention_block,
    ))
    optim = Optim(lr=1e-3, b2=0.999, schedule="constant", warmup_steps=0, min_lr_ratio=0.0)
    tx, schedule = make_optimizer(optim, steps + warmup)
    state = jax.jit(init_state_fn(model, tx, seq_len))(jax.random.PRNGKey(0))
    step = make_train_step(model.apply, tx, schedule)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    batch_arrays = {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq_len), np.int32),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
    }
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = step(state, batch_arrays)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_time = float(np.median(times))
    return {"tokens_per_s": batch * seq_len / step_time, "step_time_s": step_time}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--n_kv_heads", type=int, default=4)
    p.add_argument("--mlp_hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    shape = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                 mlp_hidden=args.mlp_hidden, vocab=args.vocab, seq_len=args.seq_len)
    flops_per_token = llama_train_flops_per_token(**shape)["train_flops_per_token"]
    matmul_rate = measure_matmul_flops()
    print(f"machine: {os.cpu_count()} CPU cores, f32 matmul {matmul_rate / 1e9:.0f} GFLOP/s (n=2048, jax)")
    print(f"shape: {shape} batch={args.batch}; analytic train FLOPs/token {flops_per_token / 1e6:.2f}M (full attention)")
    results = {}
    for name, fn in [
        ("torch (HF Llama + AdamW)", lambda: torch_reference_tokens_per_s(**shape, batch=args.batch, steps=args.steps, warmup=args.warmup)),
        ("lmjax (nn.scan layers)", lambda: lmjax_tokens_per_s(**shape, batch=args.batch, steps=args.steps, warmup=args.warmup)),
        ("lmjax (unrolled layers)", lambda: lmjax_tokens_per_s(**shape, batch=args.batch, steps=args.steps, warmup=args.warmup, scan_layers=False)),
        # The recipes' setting: causal block skipping (one sequence a row, so no length promise).
        ("lmjax (unrolled, blocks 64)", lambda: lmjax_tokens_per_s(**shape, batch=args.batch, steps=args.steps, warmup=args.warmup, scan_layers=False, attention_block=64)),
    ]:
        r = fn()
        results[name] = r["tokens_per_s"]
        frac = r["tokens_per_s"] * flops_per_token / matmul_rate
        print(f"{name:28s} {r['tokens_per_s']:9.0f} tokens/s  step {r['step_time_s'] * 1e3:7.1f} ms  "
              f"{frac:5.1%} of matmul peak")
    torch_rate = results["torch (HF Llama + AdamW)"]
    for name, rate in results.items():
        if not name.startswith("torch"):
            print(f"ratio {name} / torch: {rate / torch_rate:.2f}x")


if __name__ == "__main__":
    main()
