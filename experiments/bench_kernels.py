"""Pallas kernels vs their XLA (and vendor) counterparts, one line per case.

    python experiments/bench_kernels.py                 # every group; on a CPU: correctness only
    python experiments/bench_kernels.py --only attention --quick        # T=2k only, 3 repeats
    python experiments/bench_kernels.py --only attention --seq_lens 2048,4096 --mask packed

Each group first checks its kernel against the reference on a small shape (on a CPU in Pallas
interpret mode, on a GPU compiled), then, on an accelerator, times every case: warm-up, median
of `--repeats`, both sides in the same process. A side that fails (out of memory, unsupported)
prints its error in place of its time; `--time_budget_s` stops before a case would start late.

Groups are entries of GROUPS: a name -> (check, cases, run_case).

scans: Mamba's selective scan (lmjax.models.scans.selective_scan), forward + backward, with a
packed-segment reset mid-row: sequential (lax.scan) vs chunked (associative scans in chunks of
64) vs pallas (lmjax.kernels.ssm_scan), f32, D=1024 channels, N=16; speed-up over sequential.

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


# ----------------------------------------------------------------------------- scans


@dataclasses.dataclass(frozen=True)
class ScanCase:
    seq_len: int
    batch: int
    channels: int = 1024  # Mamba's inner width (expand x dim)
    state: int = 16

    def label(self):
        return f"selective scan T={self.seq_len} B={self.batch} D={self.channels} N={self.state} f32"


SCAN_METHODS = ("sequential", "chunked", "pallas")


def scan_inputs(case, seed=0):
    B, T, D, N = case.batch, case.seq_len, case.channels, case.state
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(keys[0], (B, T, D))
    dt = jax.nn.softplus(jax.random.normal(keys[1], (B, T, D)) - 2.0)
    A = -jnp.exp(jax.random.normal(keys[2], (D, N)) * 0.5)
    Bm = jax.random.normal(keys[3], (B, T, N))
    C = jax.random.normal(keys[4], (B, T, N))
    reset = jnp.zeros((B, T), bool).at[:, T // 2].set(True)  # a packed boundary mid-row
    return x, dt, A, Bm, C, reset


def scan_fn(method, chunk=64):
    from lmjax.models.scans import selective_scan

    def run(x, dt, A, Bm, C, reset):
        h0 = jnp.zeros((x.shape[0], x.shape[2], A.shape[1]), jnp.float32)
        return selective_scan(x, dt, A, Bm, C, reset, h0, method, chunk)[0]

    return run


def scan_fwd_bwd(run):
    def loss(x, dt, Bm, C, A, reset):
        return jnp.sum(run(x, dt, A, Bm, C, reset) * jnp.cos(jnp.arange(x.shape[-1], dtype=jnp.float32)))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def scan_check(args):
    """The three scans against each other (outputs and gradients) on a small shape."""
    case = ScanCase(seq_len=48, batch=2, channels=16, state=4)
    x, dt, A, Bm, C, reset = scan_inputs(case, seed=1)
    ref_out = np.asarray(jax.jit(scan_fn("sequential"))(x, dt, A, Bm, C, reset))
    ref_grads = [np.asarray(g) for g in scan_fwd_bwd(scan_fn("sequential"))(x, dt, Bm, C, A, reset)]
    failures = []
    for method in SCAN_METHODS[1:]:
        out = np.asarray(jax.jit(scan_fn(method, chunk=16))(x, dt, A, Bm, C, reset))
        grads = [np.asarray(g) for g in scan_fwd_bwd(scan_fn(method, chunk=16))(x, dt, Bm, C, A, reset)]
        errors = [np.abs(out - ref_out).max() / max(1, np.abs(ref_out).max())]
        errors += [np.abs(a - b).max() / max(1, np.abs(b).max()) for a, b in zip(grads, ref_grads)]
        ok = max(errors) <= 1e-4
        print(f"check {case.label()} {method} vs sequential: max rel err out/dx/ddt/dB/dC/dA "
              f"{' '.join(f'{e:.1e}' for e in errors)} (tol 1e-04) {'ok' if ok else 'FAIL'}", flush=True)
        if not ok:
            failures.append(f"{case.label()} {method}")
    return failures


def scan_cases(args):
    return [ScanCase(seq_len=T, batch=max(1, args.tokens_per_batch // T // 4)) for T in args.seq_lens]


def scan_run_case(case, args):
    inputs = scan_inputs(case)
    x, dt, A, Bm, C, reset = inputs
    times = {}
    for method in SCAN_METHODS:
        try:
            times[method] = median_seconds(scan_fwd_bwd(scan_fn(method)), (x, dt, Bm, C, A, reset), args.repeats)
        except Exception as e:  # an OOM or an unsupported configuration must not end the run
            times[method] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    parts = [case.label(), "fwd+bwd:"]
    for name, t in times.items():
        parts.append(f"{name} {t * 1e3:.2f} ms" if isinstance(t, float) else f"{name} [{t}]")
    for name in ("chunked", "pallas"):
        if isinstance(times.get(name), float) and isinstance(times.get("sequential"), float):
            parts.append(f"sequential/{name} {times['sequential'] / times[name]:.2f}x")
    parts.append(f"[{jax.devices()[0].device_kind}]")
    return "  ".join(parts)


# ----------------------------------------------------------------------------- driver

GROUPS = {
    "attention": (attention_check, attention_cases, attention_run_case),
    "scans": (scan_check, scan_cases, scan_run_case),
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
