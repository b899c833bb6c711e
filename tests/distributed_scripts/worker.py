"""One process of a multi-process test run: python worker.py MODE CONFIG_JSON.

MODE
  sum           initialise, all-gather the process ids, sum them with a jitted computation over
                the global mesh, print the result as JSON, exit normally (process 0 lingers
                `linger_s` seconds first: a peer that has exited must not be taken for dead).
  loop[:N]      initialise, then all-reduce over the processes forever, printing READY once the
                collectives run; with :N, process `crash` raises at iteration N.
CONFIG_JSON   the `parallel.distributed` section, plus the test's own keys `linger_s` and `crash`.
"""
import json
import sys
import time

import numpy as np

from lmjax.parallel import distributed


def global_sum(values):
    """Sum of one number per process, computed by a jitted program over all processes' devices."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("processes",))
    x = jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec("processes")), np.full(jax.local_device_count(), values, np.float32)
    )
    return jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(x)


def main():
    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    linger_s, crash = cfg.pop("linger_s", 0), cfg.pop("crash", None)
    print(json.dumps({"initializing_at": time.time()}), flush=True)
    multi = distributed.initialize(cfg)
    assert distributed.initialize(cfg) == multi  # idempotent

    import jax
    from jax.experimental import multihost_utils

    if mode == "sum":
        ids = multihost_utils.process_allgather(np.int32(jax.process_index()))
        total = float(global_sum(jax.process_index()) / jax.local_device_count())
        result = {"multi": multi, "ids": ids.tolist(), "total": total, **distributed.process_info()}
        print(json.dumps(result), flush=True)
        if jax.process_index() == 0:
            time.sleep(linger_s)
        return
    crash_at = int(mode.split(":")[1]) if ":" in mode else None
    for step in range(10**9):
        if step == 20:
            print("READY", flush=True)
        if step == crash_at and jax.process_index() == crash:
            raise RuntimeError(f"process {crash} fails on purpose at step {step}")
        float(global_sum(step))
        time.sleep(0.01)


if __name__ == "__main__":
    main()
