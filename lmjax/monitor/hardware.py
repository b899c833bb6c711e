"""The machine's FLOP/s limit: a table for known accelerators, a measured matmul for the rest.

Benchmarks report "fraction of the machine's limit" (MFU). On accelerators that limit is the
vendor's dense peak; on a CPU there is no honest table value, so we measure a large matmul and
use that as the practical ceiling.
"""

import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak FLOP/s per chip. Keys are lower-case substrings of
# `device.device_kind`, checked in order, so the more specific names come first
# ("tpu v5 lite" before "tpu v5", "h100 pcie" before "h100").
# float32 is the non-tensor-core figure on GPUs; TPUs have no native f32 matmul (None).
_PEAK_FLOPS: tuple[tuple[tuple[str, ...], dict[str, float | None]], ...] = (
    (("h100 pcie",), {"bfloat16": 756e12, "float32": 51e12}),
    (("h100", "h200", "gh200"), {"bfloat16": 989e12, "float32": 67e12}),
    (("a100",), {"bfloat16": 312e12, "float32": 19.5e12}),
    (("tpu v4",), {"bfloat16": 275e12, "float32": None}),
    (("tpu v5 lite", "tpu v5e"), {"bfloat16": 197e12, "float32": None}),
    (("tpu v5p", "tpu v5"), {"bfloat16": 459e12, "float32": None}),
    (("tpu v6 lite", "tpu v6e", "tpu v6"), {"bfloat16": 918e12, "float32": None}),
)


def peak_flops_for_device(device, dtype: str = "bfloat16") -> float | None:
    """Vendor dense peak FLOP/s of one chip for `dtype`, or None when unknown (CPUs, new chips)."""
    kind = str(getattr(device, "device_kind", "")).lower()
    for names, peaks in _PEAK_FLOPS:
        if any(name in kind for name in names):
            return peaks.get(str(jnp.dtype(dtype)))
    return None


def measure_matmul_flops(n: int = 2048, dtype: str = "float32", repeats: int = 5,
                         device=None) -> float:
    """FLOP/s of an n x n @ n x n matmul under jit: median of `repeats` timed calls after warm-up."""
    device = device or jax.devices()[0]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(key_b, (n, n), dtype), device)
    # HIGHEST for f32 so a GPU does not silently run TF32 and report a tensor-core number.
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
    for _ in range(2):  # compile, then one more call so caches and clocks settle
        matmul(a, b).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds)


def flops_limit(device=None, dtype: str = "float32") -> tuple[float, str]:
    """(FLOP/s, where it came from): the table's peak when known, else a measured matmul."""
    device = device or jax.devices()[0]
    peak = peak_flops_for_device(device, dtype)
    if peak is not None:
        return peak, f"peak table ({device.device_kind})"
    return measure_matmul_flops(dtype=dtype, device=device), f"measured matmul ({device.device_kind})"


def measure_read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 8, device=None) -> float:
    """Bytes/s of reading a large f32 array once: the best of a jitted sum and a jitted
    matrix-vector product over it, fastest of `repeats` (a floor must use the best rate seen)."""
    device = device or jax.devices()[0]
    side = int((n_bytes // 4) ** 0.5)
    matrix = jax.device_put(jnp.ones((side, side), jnp.float32), device)
    vector = jax.device_put(jnp.ones((side,), jnp.float32), device)
    readers = (jax.jit(jnp.sum), jax.jit(lambda m: m @ vector))
    best = 0.0
    for read in readers:
        read(matrix).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            read(matrix).block_until_ready()
            best = max(best, matrix.nbytes / (time.perf_counter() - start))
    return best


def cpu_model() -> str:
    """The CPU's model name and core count (for benchmark tables: timings travel badly between CPUs)."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or 'unknown CPU'}, {os.cpu_count()} CPU(s)"
