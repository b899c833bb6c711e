"""XLA:CPU settings applied by the command-line entry points before jax starts.

The YNNPACK fusion pass of XLA:CPU (jax 0.10) makes the small-matrix training steps of the CPU
recipes ~15-25% slower on 2 cores, so it is turned off unless the user set XLA_FLAGS for it.
The flag only affects the CPU backend; GPU/TPU runs are unchanged.
"""
import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def tune_xla_cpu_flags():
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_FLAGS:
        name = flag.split("=")[0]
        if name not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
