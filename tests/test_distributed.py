"""Multi-host start (lmjax/parallel/distributed.py) with two real processes on this machine.

Each case launches tests/distributed_scripts/worker.py twice, wired through a coordinator on
127.0.0.1 and gloo collectives on CPU. Timeouts are a few seconds so failures show in seconds;
the margins on measured times allow for a loaded two-core machine.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import portpicker
import pytest

from lmjax.config import Distributed
from lmjax.parallel import distributed
from lmjax.registry import ConfigError

WORKER = Path(__file__).resolve().parent / "distributed_scripts" / "worker.py"
HEARTBEAT_S = 3
# Process start-up and interpreter teardown on two busy CI cores took up to 2.7 s beyond the
# watchdog's own period (HEARTBEAT_S / 5); jax's own defaults are minutes, so 6 s still tells them apart.
MARGIN_S = 6
# For "stops at once" cases: a heartbeat long enough that a slow exit never reaches it.
LONG_HEARTBEAT_S = 30
CLUSTER_ENV = ("JAX_", "SLURM_", "OMPI_", "TPU_", "KUBERNETES_")


def clean_env(subprocess_env, **extra):
    """The test environment without launcher variables, so that only what a test sets counts."""
    env = {k: v for k, v in subprocess_env.items() if not k.startswith(CLUSTER_ENV)}
    env.update(extra)
    return env


class Worker:
    """A worker process whose stdout lines are collected as they come."""

    def __init__(self, mode, cfg, env):
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), mode, json.dumps(cfg)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_for(self, line, timeout=60):
        deadline = time.monotonic() + timeout
        while line + "\n" not in self.lines:
            assert self.proc.poll() is None, f"worker exited: {self.proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"no {line!r} after {timeout} s"
            time.sleep(0.05)

    def finish(self, timeout=60):
        """(exit status, stderr), killing the worker if it outlives `timeout`."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = f"still running after {timeout} s"
        return status, self.proc.stderr.read()

    def json_lines(self):
        return [json.loads(line) for line in self.lines if line.startswith("{")]


def two_workers(mode, env, **cfg):
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    base = dict(coordinator_address=address, num_processes=2, init_timeout_s=30, heartbeat_timeout_s=HEARTBEAT_S)
    return [Worker(mode, {**base, **cfg, "process_id": i}, env) for i in range(2)]


def assert_summed(workers):
    for i, worker in enumerate(workers):
        status, err = worker.finish()
        assert status == 0, err[-3000:]
        assert "lmjax: error" not in err
        result = worker.json_lines()[-1]
        assert result["multi"] and result["ids"] == [0, 1] and result["total"] == 1.0
        assert (result["process_index"], result["process_count"], result["device_count"]) == (i, 2, 2)


@pytest.mark.slow  # local processes and time-outs
def test_two_processes_from_config_sum_their_ids_and_exit_cleanly(subprocess_env):
    # process 0 lingers past the heartbeat timeout after process 1 left: no false alarm
    assert_summed(two_workers("sum", clean_env(subprocess_env), linger_s=HEARTBEAT_S + 1))


@pytest.mark.slow  # local processes and time-outs
def test_two_processes_from_environment_variables_only(subprocess_env):
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    workers = [
        Worker("sum", {}, clean_env(subprocess_env, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                                    JAX_PROCESS_ID=str(i)))
        for i in range(2)
    ]
    assert_summed(workers)


def slurm_env(subprocess_env, process_id, ntasks=2, port=0):
    """What `srun --ntasks=2` on one node sets, as far as jax's SLURM detection reads it."""
    return clean_env(
        subprocess_env, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(ntasks),
        SLURM_PROCID=str(process_id), SLURM_LOCALID=str(process_id), JAX_COORDINATOR_PORT=str(port),
    )


@pytest.mark.slow  # local processes and time-outs
def test_two_processes_from_a_slurm_step_are_detected_by_jax(subprocess_env):
    port = portpicker.pick_unused_port()
    cfg = dict(init_timeout_s=30, heartbeat_timeout_s=HEARTBEAT_S)
    assert_summed([Worker("sum", cfg, slurm_env(subprocess_env, i, port=port)) for i in range(2)])


@pytest.mark.slow  # local processes and time-outs
def test_a_missing_peer_stops_the_process_at_init_timeout_with_one_line(subprocess_env):
    timeout_s = 3
    addresses = [f"127.0.0.1:{portpicker.pick_unused_port()}" for _ in range(2)]
    # process 0 alone waits for a peer; process 1 alone waits for a coordinator that never starts
    alone = [
        Worker("sum", dict(coordinator_address=address, num_processes=2, process_id=i, init_timeout_s=timeout_s),
               clean_env(subprocess_env))
        for i, address in enumerate(addresses)
    ]
    for worker, address in zip(alone, addresses):
        status, err = worker.finish()
        elapsed = time.time() - worker.json_lines()[0]["initializing_at"]
        assert status == distributed.EXIT_STATUS
        assert err.count("\n") == 1 and err.startswith("lmjax: error: not all 2 processes"), err[-3000:]
        assert address in err and "parallel.distributed.init_timeout_s" in err
        assert timeout_s <= elapsed < timeout_s + MARGIN_S


@pytest.mark.slow  # local processes and time-outs
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_peer_that_dies_or_hangs_mid_run_stops_the_survivor_within_the_heartbeat_timeout(subprocess_env, how):
    survivor, victim = two_workers("loop", clean_env(subprocess_env))
    survivor.wait_for("READY")
    victim.wait_for("READY")
    victim.proc.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    start = time.monotonic()
    status, err = survivor.finish()
    elapsed = time.monotonic() - start
    victim.proc.kill()
    victim.finish()
    # killed: gloo's "Connection reset by peer" traceback comes first; frozen: the survivor is blocked
    assert status == distributed.EXIT_STATUS, err[-3000:]
    assert err.splitlines()[-1].startswith("lmjax: error: process 1 of 2 sent no heartbeat for 3 s")
    assert "parallel.distributed.heartbeat_timeout_s" in err and "Check failure" not in err
    assert HEARTBEAT_S - 0.5 < elapsed < HEARTBEAT_S + MARGIN_S


@pytest.mark.slow  # local processes and time-outs
@pytest.mark.parametrize("failing", [0, 1])
def test_a_peer_that_raises_stops_the_other_at_once_without_cpp_aborts(subprocess_env, failing):
    workers = two_workers("loop:60", clean_env(subprocess_env), crash=failing, heartbeat_timeout_s=LONG_HEARTBEAT_S)
    for worker in workers:
        worker.wait_for("READY")
    start = time.monotonic()
    (failed_status, failed_err), (other_status, other_err) = (workers[failing].finish(), workers[1 - failing].finish())
    assert time.monotonic() - start < LONG_HEARTBEAT_S / 2  # not the heartbeat: the failure is announced
    assert failed_status == other_status == distributed.EXIT_STATUS
    assert f"RuntimeError: process {failing} fails on purpose" in failed_err
    assert failed_err.splitlines()[-1].startswith(f"lmjax: error: process {failing} of 2 stopped with the error above")
    assert other_err.splitlines()[-1].startswith(f"lmjax: error: process {failing} of 2 stopped with an error")
    assert "Check failure" not in failed_err + other_err


@pytest.mark.slow  # local processes and time-outs
def test_survivors_of_a_killed_coordinator_are_aborted_by_jax_at_once(subprocess_env):
    """Documents jax 0.10's behaviour that lmjax cannot change: no Python runs before the abort."""
    coordinator, survivor = two_workers("loop", clean_env(subprocess_env), heartbeat_timeout_s=LONG_HEARTBEAT_S)
    coordinator.wait_for("READY")
    survivor.wait_for("READY")
    coordinator.proc.kill()
    start = time.monotonic()
    status, err = survivor.finish()
    assert time.monotonic() - start < LONG_HEARTBEAT_S / 2
    assert status == -signal.SIGABRT and "Terminating process because the JAX distributed service" in err


# --- settings, in this process: nothing here starts jax.distributed ------------------------


@pytest.fixture
def plain_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(CLUSTER_ENV):
            monkeypatch.delenv(name)
    return monkeypatch


def test_a_plain_process_stays_single(plain_env):
    assert distributed.initialize({}) is False
    assert distributed.initialize(Distributed()) is False
    assert distributed.initialize(dict(num_processes=1)) is False
    for name, value in slurm_env({}, process_id=0, ntasks=1).items():  # a one-task SLURM step
        plain_env.setenv(name, value)
    assert distributed.initialize({}) is False


@pytest.mark.parametrize("cfg, env, message", [
    (dict(num_processes=2), {},
     "parallel.distributed.num_processes=2 is set but parallel.distributed.coordinator_address "
     "(or JAX_COORDINATOR_ADDRESS) and parallel.distributed.process_id (or JAX_PROCESS_ID) are not"),
    (dict(coordinator_address="10.0.0.1:1234", process_id=0), {},
     "parallel.distributed.num_processes (or JAX_NUM_PROCESSES) is not"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2), {},
     "parallel.distributed.process_id=2 is out of range for parallel.distributed.num_processes=2; use 0..1"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2), {"JAX_PROCESS_ID": "5"},
     "JAX_PROCESS_ID=5 is out of range for parallel.distributed.num_processes=2"),
    (dict(), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an integer."),
    (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), {},
     "parallel.distributed.coordinator_address='10.0.0.1' must be host:port"),
    (dict(heartbeat_timeout_s=0), {}, "parallel.distributed.heartbeat_timeout_s=0 must be a positive number"),
])
def test_half_set_or_invalid_settings_raise_one_line_config_errors(plain_env, cfg, env, message):
    for name, value in env.items():
        plain_env.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        distributed.initialize(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_values_win_over_the_environment(plain_env):
    plain_env.setenv("JAX_PROCESS_ID", "7")
    with pytest.raises(ConfigError, match=r"parallel.distributed.process_id=3 is out of range"):
        distributed.initialize(dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=3))
