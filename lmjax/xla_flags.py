"""XLA settings applied by the command-line entry points before jax starts.

The YNNPACK fusion pass of XLA:CPU (jax 0.10) makes the small-matrix training steps of the CPU
recipes ~15-25% slower on 2 cores, so it is turned off unless the user set XLA_FLAGS for it.
The flag only affects the CPU backend; GPU/TPU runs are unchanged. Generation's programs take
the fusions back (`decoding_compiler_options`): there the tied output head, a [rows, E] x [V, E]^T
product with 2-64 rows, runs 2-15x slower on XLA:CPU's own dot than on YNNPACK's, and a SmolLM2
decode step at 16 lanes 1.3x slower.

Compiled programs are kept in a persistent cache (jax's compilation cache), so that the next run
with the same shapes loads them instead of compiling (~5 s of the facts recipe's start-up on a
2-core CPU). Where: $LMJAX_COMPILATION_CACHE (`off` disables it), default
~/.cache/lmjax/jax/<machine>; a JAX_COMPILATION_CACHE_DIR set by the user wins. <machine> names
the CPU model and its instruction-set flags, since XLA:CPU code is built for the host's CPU and
a home folder may be shared by different machines.
"""
import hashlib
import os
import platform
from pathlib import Path

YNN_FUSION = "xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"--{YNN_FUSION}=",)
YNN_DEFAULT = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"  # jax 0.10's own setting, given back to decoding
# jax's default (1 s) would leave out the facts recipe's eval step and parameter init.
MIN_COMPILE_SECONDS_TO_CACHE = "0.2"
CACHE_MAX_BYTES = str(2 * 1024**3)  # least recently used programs go first


def tune_xla_cpu_flags():
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_FLAGS:
        name = flag.split("=")[0]
        if name not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
    use_compilation_cache()


def decoding_compiler_options() -> dict:
    """`compiler_options` for the decoders' jitted programs: on CPU, where tune_xla_cpu_flags
    turned YNNPACK's dot fusions off, jax's default back; otherwise (another backend, or
    XLA_FLAGS set otherwise by the user) nothing."""
    import jax

    if jax.default_backend() != "cpu" or CPU_FLAGS[0] not in os.environ.get("XLA_FLAGS", "").split():
        return {}
    return {YNN_FUSION: YNN_DEFAULT}


def machine_tag() -> str:
    """A short name for this kind of machine: architecture plus a hash of the CPU model and flags."""
    description = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        description += "".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:  # not Linux: the processor string is what there is
        description += platform.processor()
    return f"{platform.machine()}-{hashlib.sha256(description.encode()).hexdigest()[:12]}"


def use_compilation_cache():
    """Point jax's persistent compilation cache at lmjax's folder (see the module doc)."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    where = os.environ.get("LMJAX_COMPILATION_CACHE", "")
    if where.lower() in ("off", "0", "none", "false"):
        return
    folder = Path(where) if where else Path.home() / ".cache" / "lmjax" / "jax" / machine_tag()
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", MIN_COMPILE_SECONDS_TO_CACHE)
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", CACHE_MAX_BYTES)
