"""Pallas kernels vs their XLA (and vendor) counterparts, one line per case.

    python experiments/bench_kernels.py                 # every group; on a CPU: correctness only
    python experiments/bench_kernels.py --only attention --quick        # T=2k only, 3 repeats
    python experiments/bench_kernels.py --only attention --seq_lens 2048,4096 --mask packed

Each group first checks its kernel against the reference on a small shape (on a CPU in Pallas
interpret mode, on a GPU compiled), then, on an accelerator, times every case: warm-up, median
of `--repeats`, both sides in the same process. A side that fails (out of memory, unsupported)
prints its error in place of its time; `--time_budget_s` stops before a case would start late.

Groups are entries of GROUPS: a name -> (check, cases, run_case). Add another kernel family
(e.g. scans) as its own group without touching the attention one.

attention: forward + backward (grad of a scalar loss w.r.t. q, k, v) of causal / packed /
prefix-LM attention at T = 2k, 4k, 8k tokens, B·T = 16k tokens, 16 query heads sharing 4 kv
heads of dim 128, bf16: pallas (lmjax.kernels.flash_attention) vs xla (lmjax's einsum
reference) vs cudnn (jax.nn.dot_product_attention, implementation="cudnn"; is_causal=True for
the causal mask, the dense mask otherwise). Ratio = pallas time / other time (< 1: pallas is
faster). FLOPs: causal-halved 4·B·H·T²·D forward, x3.5 for forward + backward (FlashAttention-2
convention), as a fraction of the chip's dense bf16 peak (lmjax.monitor.hardware).
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.models.attention import AttentionMask, cudnn_attention, pallas_attention, xla_attention
from lmjax.monitor.hardware import peak_flops_for_device


def median_seconds(fn, args, repeats, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_bwd(attend):
    """jit(grad) of sum(out * fixed cotangent) w.r.t. q, k, v: forward + backward."""

    def loss(q, k, v):
        out = attend(q, k, v).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(jnp.arange(out.shape[-1], dtype=jnp.float32)))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


# ----------------------------------------------------------------------------- attention


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    seq_len: int
    batch: int
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 128
    dtype: str = "bfloat16"
    mask: str = "causal"  # causal | packed | prefix

    def label(self):
        return (f"attention T={self.seq_len} B={self.batch} H={self.heads} K={self.kv_heads} "
                f"D={self.head_dim} {self.dtype} {self.mask}")


def attention_inputs(case, seed=0):
    B, T = case.batch, case.seq_len
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    dt = jnp.dtype(case.dtype)
    q = jax.random.normal(keys[0], (B, T, case.heads, case.head_dim), dt)
    k = jax.random.normal(keys[1], (B, T, case.kv_heads, case.head_dim), dt)
    v = jax.random.normal(keys[2], (B, T, case.kv_heads, case.head_dim), dt)
    segment_ids = np.ones((B, T), np.int32)
    prompt = None
    if case.mask in ("packed", "prefix"):  # documents of ~T/4 tokens, the last 3% padding
        segment_ids = np.minimum(np.arange(T) // max(1, T // 4) + 1, 4)[None].repeat(B, 0).astype(np.int32)
        segment_ids[:, T - T // 32:] = 0
    if case.mask == "prefix":  # the first 1/8 of each document is its prompt
        starts = np.arange(T) % max(1, T // 4)
        prompt = jnp.asarray((starts < max(1, T // 32)) & (segment_ids != 0))
    return q, k, v, AttentionMask.packed(jnp.asarray(segment_ids), prompt)


def attention_sides(case, mask, block_q, block_k, backend=None):
    sides = {
        "pallas": lambda q, k, v: pallas_attention(q, k, v, mask, block_q=block_q, block_k=block_k, backend=backend),
        "xla": lambda q, k, v: xla_attention(q, k, v, mask),
    }
    if jax.default_backend() == "gpu":
        if case.mask == "causal":
            sides["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        else:
            sides["cudnn"] = lambda q, k, v: cudnn_attention(q, k, v, mask)
    return sides


def attention_check(args):
    """pallas vs xla, forward and gradients, on a small shape (interpret mode off-accelerator)."""
    on_cpu = jax.default_backend() == "cpu"
    failures = []
    for mask in ("causal", "packed", "prefix"):
        for dtype, tol in (("float32", 2e-5 if on_cpu else 2e-2), ("bfloat16", 5e-2)):
            # GPU f32 matmuls may run as TF32 on either side: hence the looser f32 tolerance there.
            case = AttentionCase(seq_len=80 if on_cpu else 300, batch=2, heads=4, kv_heads=2,
                                 head_dim=16 if on_cpu else 64, dtype=dtype, mask=mask)
            q, k, v, m = attention_inputs(case, seed=1)
            block = 32 if on_cpu else 64
            sides = attention_sides(case, m, block, block)
            f32 = lambda a: np.asarray(a, np.float32)
            outs = {n: f32(jax.jit(fn)(q, k, v)) for n, fn in list(sides.items())[:2]}
            grads = {n: [f32(g) for g in fwd_bwd(fn)(q, k, v)] for n, fn in list(sides.items())[:2]}
            errors = [np.abs(outs["pallas"] - outs["xla"]).max() / max(1, np.abs(outs["xla"]).max())]
            errors += [np.abs(a - b).max() / max(1, np.abs(b).max()) for a, b in zip(grads["pallas"], grads["xla"])]
            ok = max(errors) <= tol and all(np.isfinite(e) for e in errors)
            print(f"check {case.label()}: max rel err out/dq/dk/dv "
                  f"{' '.join(f'{e:.1e}' for e in errors)} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}", flush=True)
            if not ok:
                failures.append(case.label())
    return failures


def attention_cases(args):
    tokens = args.tokens_per_batch
    return [AttentionCase(seq_len=T, batch=max(1, tokens // T), mask=args.mask, dtype=args.dtype) for T in args.seq_lens]


def attention_run_case(case, args):
    q, k, v, mask = attention_inputs(case)
    times = {}
    for name, attend in attention_sides(case, mask, args.block_q, args.block_k).items():
        try:
            times[name] = median_seconds(fwd_bwd(attend), (q, k, v), args.repeats)
        except Exception as e:  # an OOM or an unsupported configuration must not end the run
            times[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    fwd_flops = 4 * case.batch * case.heads * case.seq_len**2 * case.head_dim * (0.5 if case.mask == "causal" else 1.0)
    flops = 3.5 * fwd_flops
    device = jax.devices()[0]
    peak = peak_flops_for_device(device, case.dtype)
    parts = [case.label(), "fwd+bwd:"]
    for name, t in times.items():
        parts.append(f"{name} {t * 1e3:.2f} ms" if isinstance(t, float) else f"{name} [{t}]")
    for other in ("xla", "cudnn"):
        if isinstance(times.get("pallas"), float) and isinstance(times.get(other), float):
            parts.append(f"pallas/{other} {times['pallas'] / times[other]:.2f}")
    if peak and isinstance(times.get("pallas"), float):
        parts.append(f"pallas {flops / times['pallas'] / peak:.0%} of peak")
    parts.append(f"[{device.device_kind}]")
    return "  ".join(parts)


# ----------------------------------------------------------------------------- driver

GROUPS = {
    "attention": (attention_check, attention_cases, attention_run_case),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups: {', '.join(GROUPS)}")
    p.add_argument("--quick", action="store_true", help="smallest size only, 3 repeats")
    p.add_argument("--seq_lens", default="2048,4096,8192")
    p.add_argument("--tokens_per_batch", type=int, default=16384, help="batch = this // seq_len")
    p.add_argument("--mask", default="causal", choices=["causal", "packed", "prefix"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--block_q", type=int, default=128)
    p.add_argument("--block_k", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--time_budget_s", type=float, default=480.0, help="start no case after this")
    p.add_argument("--skip_check", action="store_true")
    p.add_argument("--time_on_cpu", action="store_true", help="time even on a CPU (interpret mode: slow, meaningless)")
    args = p.parse_args(argv)
    args.seq_lens = [int(s) for s in args.seq_lens.split(",")]
    if args.quick:
        args.seq_lens, args.repeats = args.seq_lens[:1], 3
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        sys.exit(f"Unknown group(s) {', '.join(unknown)} in --only; choose from: {', '.join(GROUPS)}.")

    start = time.perf_counter()
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})", flush=True)
    failed = []
    for name in groups:
        check, cases, run_case = GROUPS[name]
        if not args.skip_check:
            failed += check(args)
        if jax.default_backend() == "cpu" and not args.time_on_cpu:
            print(f"{name}: timing skipped on a CPU (Pallas runs in interpret mode); run on a GPU/TPU.")
            continue
        for case in cases(args):
            if time.perf_counter() - start > args.time_budget_s:
                print(f"{case.label()}: skipped, past --time_budget_s={args.time_budget_s:.0f}", flush=True)
                continue
            print(run_case(case, args), flush=True)
    if failed:
        sys.exit(f"{len(failed)} correctness check(s) failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
