"""The entry points' persistent compilation cache: where it goes, how to turn it off, and that a
second process loads the first one's programs instead of compiling them."""
import os
import subprocess
import sys

from lmjax.xla_flags import machine_tag

REPORT = """
import os, sys
from lmjax.xla_flags import tune_xla_cpu_flags
tune_xla_cpu_flags()
import jax, jax.numpy as jnp
print("dir:", jax.config.jax_compilation_cache_dir)
if len(sys.argv) > 1:
    import logging
    logging.basicConfig(level=logging.WARNING)
    jax.config.update("jax_explain_cache_misses", True)  # logs a miss as a warning
    x = jnp.arange(64.0).reshape(8, 8)
    print("value:", float(jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(x)))
"""


def run_report(env, *args):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "LMJAX_COMPILATION_CACHE"))}
    clean.update(env, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    result = subprocess.run([sys.executable, "-c", REPORT, *args], env=clean, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def test_default_folder_names_the_machine_and_off_disables_it(tmp_path):
    assert f"dir: {tmp_path}/.cache/lmjax/jax/{machine_tag()}" in run_report({"HOME": str(tmp_path)}).stdout
    assert "dir: None" in run_report({"LMJAX_COMPILATION_CACHE": "off"}).stdout
    own = tmp_path / "mine"
    assert f"dir: {own}" in run_report({"LMJAX_COMPILATION_CACHE": str(own)}).stdout


def test_second_process_hits_the_cache(tmp_path):
    env = {"LMJAX_COMPILATION_CACHE": str(tmp_path / "cache")}
    first = run_report(env, "compute")
    assert "PERSISTENT COMPILATION CACHE MISS" in first.stderr and any((tmp_path / "cache").iterdir())
    second = run_report(env, "compute")
    assert "PERSISTENT COMPILATION CACHE MISS" not in second.stderr, second.stderr
    assert second.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]  # same value
