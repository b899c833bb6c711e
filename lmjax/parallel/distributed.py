"""Multi-host start: `jax.distributed` from the config, the environment or the cluster, with errors that say what to do.

Where the settings come from, first match wins, key by key:
  1. the config, `parallel.distributed.{coordinator_address, num_processes, process_id}`
     ("", 0 and -1 mean "not set");
  2. the environment: JAX_COORDINATOR_ADDRESS (jax reads it too), JAX_NUM_PROCESSES and
     JAX_PROCESS_ID (jax 0.10 does not read these two; lmjax does, the names jax's own
     proposals used);
  3. with none of the three set, the cluster jax detects by itself (SLURM `srun` steps, Open MPI
     `mpirun`, Cloud TPU pods, Kubernetes): when it holds more than one process, lmjax calls
     `jax.distributed.initialize()` and lets jax fill in the rest.
Nothing set, no cluster: a single plain process, and nothing is initialised.

How a multi-process run fails (measured with jax 0.10.2, CPU + gloo, two local processes):
  - A peer that never arrives: jax aborts the process from C++ (SIGABRT, a "Check failure stack
    trace") about 5 s after `initialization_timeout`. lmjax gives jax a later deadline and stops
    the process itself at `init_timeout_s` with one line naming the process count, the coordinator
    address and the key to raise (exit status 1).
  - A peer that dies or hangs mid-run: jax's own heartbeat aborts the survivors from C++ about
    `heartbeat_timeout_seconds` later; a peer that stops with a Python error instead sits in jax's
    shutdown barrier and leaves the others blocked in their collective for `shutdown_timeout`
    (300 s). lmjax runs a watchdog thread that beats through jax's coordination key-value store:
    every process publishes a counter and its state (running / exited / failed); a peer whose
    counter stands still for `heartbeat_timeout_s`, or which failed, stops every other process
    with one line naming it (exit status 1), before jax's later backstop. The process that hosts
    the coordinator (process 0) leaves last, so the others never lose it first.
  - Process 0 itself dying is the exception: every other process loses the coordinator's socket
    and jax aborts it at once, from C++ ("Terminating process because the JAX distributed service
    detected fatal errors"); no Python code runs first. Process 0's log holds the cause.
Limits: the watchdog is a Python thread, so a process whose main thread held the GIL for longer
than `heartbeat_timeout_s` would look hung (jax's compile and execute release it). A process that
ends by `sys.exit(nonzero)` is taken as exited normally, as atexit cannot see the status; peers
still blocked in a collective with it then wait for jax's shutdown barrier.
"""
import atexit
import dataclasses
import os
import sys
import threading
import time

from lmjax.registry import ConfigError

KEY = "parallel.distributed"
ENV = dict(coordinator_address="JAX_COORDINATOR_ADDRESS", num_processes="JAX_NUM_PROCESSES", process_id="JAX_PROCESS_ID")
UNSET = {"coordinator_address": "", "num_processes": 0, "process_id": -1}
EXIT_STATUS = 1  # a distributed failure; ConfigError exits with 2 (lmjax.main)
_KV_PREFIX = "lmjax/alive/"

_watchdog = None  # the running _Watchdog of this process, if any


def initialize(dist_cfg) -> bool:
    """Join the multi-process run described by `dist_cfg` (the `parallel.distributed` section, or a
    dict of some of its keys); False for a single process.

    Call it first, before any jax computation, device query or `jax.devices()`: jax fixes the set
    of devices the first time its backend starts. Idempotent: a second call returns what the first
    decided. A half-set configuration raises ConfigError; a peer that does not arrive within
    `init_timeout_s`, or that dies or hangs for `heartbeat_timeout_s` later, ends this process with
    a one-line error on stderr and exit status 1.
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    from lmjax.config import Distributed

    given_cfg = dataclasses.asdict(dist_cfg) if dataclasses.is_dataclass(dist_cfg) else dict(dist_cfg or {})
    cfg = {**dataclasses.asdict(Distributed()), **given_cfg}
    init_timeout = _positive(cfg, "init_timeout_s")
    heartbeat_timeout = _positive(cfg, "heartbeat_timeout_s")
    settings = {name: _setting(cfg, name) for name in ENV}  # name -> (value or None, where it came from)
    given = {name: value for name, (value, _) in settings.items() if value is not None}
    cluster = None if len(given) == 3 else _detected_cluster()
    if not given and (cluster is None or cluster[1] <= 1):
        return False
    num_processes = given.get("num_processes", cluster[1] if cluster else None)
    _check_ranges(settings, num_processes)
    if num_processes == 1:
        return False
    if cluster is None:
        _check_complete(settings)
    if "coordinator_address" in given:
        _check_address(given["coordinator_address"], settings["coordinator_address"][1])

    if jax.config.jax_cpu_collectives_implementation is None:  # unset in older jax; 0.10 defaults to gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = given.get("coordinator_address")
    coordinator = f"the coordinator at {address}" if address else f"the coordinator jax chose for {cluster[0]}"
    late = threading.Timer(init_timeout, _exit, [
        f"not all {num_processes} processes reached {coordinator} within {init_timeout} s; "
        f"start each of them with the same coordinator_address and num_processes, or raise {KEY}.init_timeout_s."
    ])
    late.daemon = True
    late.start()
    try:
        jax.distributed.initialize(
            **given,
            # jax's own deadlines come later than lmjax's: jax aborts from C++, lmjax explains
            initialization_timeout=_backstop(init_timeout),
            heartbeat_timeout_seconds=_backstop(heartbeat_timeout),
        )
    finally:
        late.cancel()
    _start_watchdog(heartbeat_timeout)
    return True


def process_info() -> dict:
    """Who this process is, for the log: index and count of processes, local and global devices."""
    import jax

    return dict(
        process_index=jax.process_index(), process_count=jax.process_count(),
        local_device_count=jax.local_device_count(), device_count=jax.device_count(),
        platform=jax.default_backend(),
    )


def shutdown():
    """Leave the run cleanly before the interpreter exits (optional: exiting does it too)."""
    import jax

    if _watchdog is not None:
        _watchdog.leave()
    jax.distributed.shutdown()


# --- settings --------------------------------------------------------------------------------


def _setting(cfg, name):
    value = cfg.get(name, UNSET[name])
    if value is not None and value != UNSET[name]:
        return (str(value) if name == "coordinator_address" else value), f"{KEY}.{name}"
    env_value = os.environ.get(ENV[name], "").strip()
    if not env_value:
        return None, f"{KEY}.{name} (or {ENV[name]})"
    if name == "coordinator_address":
        return env_value, ENV[name]
    try:
        return int(env_value), ENV[name]
    except ValueError:
        raise ConfigError(f"{ENV[name]}={env_value!r} must be an integer.") from None


def _positive(cfg, key):
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{KEY}.{key}={value!r} must be a positive number of seconds.")
    return int(value) if value == int(value) else value


def _check_complete(settings):
    missing = [where for value, where in settings.values() if value is None]
    if missing:
        given = [f"{where}={value}" for value, where in settings.values() if value is not None]
        raise ConfigError(
            f"A multi-process run needs all three of coordinator_address, num_processes and process_id: "
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not; set all three, or none for a single process."
        )


def _check_ranges(settings, num_processes):
    (process_id, id_where), (_, count_where) = settings["process_id"], settings["num_processes"]
    if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
        raise ConfigError(f"{count_where}={num_processes!r} must be a positive number of processes.")
    if process_id is None or num_processes is None:
        return
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ConfigError(
            f"{id_where}={process_id!r} is out of range for {count_where}={num_processes}; "
            f"use 0..{num_processes - 1}, one distinct id per process."
        )


def _check_address(address, where):
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{where}={address!r} must be host:port, e.g. 10.0.0.1:1234 (process 0's host).")


def _detected_cluster():
    """(name, process count) of the cluster that `jax.distributed.initialize()` would detect, or None.

    jax has no public query for this, so it asks the same cluster classes (`jax._src.clusters`)
    that `jax.distributed.initialize()` consults when called without arguments, in the same order.
    """
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.name, env.get_process_count()
    return None


def _backstop(seconds):
    return int(seconds + max(10, seconds // 2))


def _exit(message):
    """End this process now, from any thread, with one line on stderr: the main thread may be stuck in C++."""
    try:
        sys.stdout.flush()
        if message:
            sys.stderr.write(f"lmjax: error: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_STATUS)


# --- the watchdog ----------------------------------------------------------------------------


def _start_watchdog(heartbeat_timeout):
    global _watchdog
    from jax._src import distributed as jax_distributed  # the coordination client; no public handle

    state = jax_distributed.global_state
    if state.num_processes <= 1:
        return
    _watchdog = _Watchdog(state, heartbeat_timeout)
    _watchdog.start()
    previous_hook = sys.excepthook

    def mark_failed(*exc_info):
        _watchdog.crashed = True  # the atexit hook below tells the other processes
        previous_hook(*exc_info)

    sys.excepthook = mark_failed
    atexit.register(_watchdog.at_exit)  # runs before jax's own atexit shutdown (registered earlier)


class _Watchdog:
    """Liveness of the other processes, through the coordination service's key-value store.

    Each process writes `lmjax/alive/<id> = <state>:<beat>` every `period` seconds and reads the
    others'. A counter that has not moved for `timeout` seconds (as seen on this process's clock,
    so no clocks need to agree) means a dead or hung peer; state `failed` means a peer stopped on
    an error; `exited` means a peer ended normally and is no longer watched. A second thread
    reports the coordinator itself unreachable for `timeout` seconds.
    """

    def __init__(self, jax_state, timeout):
        self.jax_state = jax_state
        self.client = jax_state.client
        self.me, self.count = jax_state.process_id, jax_state.num_processes
        self.coordinator = jax_state.coordinator_address
        self.timeout = timeout
        self.period = min(5.0, max(0.2, timeout / 5))
        now = time.monotonic()
        self.peers = [p for p in range(self.count) if p != self.me]
        self.last_value = {p: None for p in self.peers}
        self.last_change = {p: now for p in self.peers}
        self.last_contact = now
        self.state, self.beat, self.crashed, self.closed = "running", 0, False, False
        self.stopping = threading.Lock()

    def start(self):
        for target in (self._watch, self._deadman):
            threading.Thread(target=target, name=f"lmjax-{target.__name__[1:]}", daemon=True).start()

    # threads

    def _watch(self):
        while not self.closed:
            values = self._exchange()
            if values is not None:
                problem = self._problem(values)
                if problem:
                    self.stop(problem)
            time.sleep(self.period)

    def _deadman(self):
        while not self.closed:
            time.sleep(self.period)
            if not self.closed and time.monotonic() - self.last_contact > self.timeout:
                self.stop(
                    f"process {self.me} of {self.count} lost the coordinator at {self.coordinator} (process 0) "
                    f"for {self.timeout} s ({KEY}.heartbeat_timeout_s); process 0 died or hangs, see its log.",
                    tell_peers=False,
                )

    # exchanges with the coordination service

    def _exchange(self):
        """Publish this process's beat and read everyone's; None when the service cannot be reached."""
        if self.jax_state.client is None:  # jax.distributed.shutdown() ran
            self.closed = True
            return None
        try:
            self.beat += 1
            self.client.key_value_set(f"{_KV_PREFIX}{self.me}", f"{self.state}:{self.beat}", allow_overwrite=True)
            values = dict(self.client.key_value_dir_get(_KV_PREFIX))
        except Exception:  # noqa: BLE001 - any RPC failure; the deadman reports one that lasts
            if self.state == "exited":  # jax's atexit shutdown has closed the client
                self.closed = True
            return None
        self.last_contact = time.monotonic()
        return values

    def _publish_quickly(self, state):
        """Tell the others this process's state, waiting at most one period (the service may be gone)."""
        self.state = state
        writer = threading.Thread(target=self._exchange, daemon=True)
        writer.start()
        writer.join(self.period)

    # judging

    def _problem(self, values, gone=None):
        """The message for a peer that failed or went silent, else None; `gone` collects the finished peers."""
        now, problem = time.monotonic(), None
        for peer in self.peers:
            value = values.get(f"{_KV_PREFIX}{peer}")
            state = value.split(":")[0] if value else "running"
            if value != self.last_value[peer]:
                self.last_value[peer], self.last_change[peer] = value, now
            silent = now - self.last_change[peer] > self.timeout
            if gone is not None and (state in ("exited", "failed") or silent):
                gone.add(peer)
            if problem or state == "exited":
                continue
            if state == "failed":
                problem = (
                    f"process {peer} of {self.count} stopped with an error, see its log; stopping process {self.me}."
                )
            elif silent:
                problem = (
                    f"process {peer} of {self.count} sent no heartbeat for {self.timeout} s "
                    f"({KEY}.heartbeat_timeout_s, coordinator {self.coordinator}); it died or hangs, see its log; "
                    f"stopping process {self.me}."
                )
        return problem

    # ending

    def stop(self, message, tell_peers=True, own_error=False):
        """Stop this process with `message`; process 0 (the coordinator) first waits for the others to leave."""
        if not self.stopping.acquire(blocking=False):
            threading.Event().wait()  # another thread is already stopping the process
        if own_error:  # a peer that failed first is the likelier cause (e.g. gloo: "Connection closed by peer")
            values = self._exchange()
            cause = self._problem(values) if values is not None else None
            message, own_error = (cause, False) if cause else (message, True)
        if tell_peers:
            self._publish_quickly("failed")
        if self.me == 0:
            message = self._wait_for_peers(message, own_error)
        _exit(message)

    def _wait_for_peers(self, message, own_error):
        """Until every peer failed, exited or went silent (bounded): the others must not lose the coordinator."""
        gone, deadline = set(), time.monotonic() + self.timeout + 2 * self.period
        while len(gone) < len(self.peers) and time.monotonic() < deadline:
            values = self._exchange()
            problem = self._problem(values, gone) if values is not None else None
            if own_error and problem and "no heartbeat" in problem:
                message, own_error = problem, False  # a dead peer explains this process's own error
            time.sleep(self.period / 2)
        return message

    def leave(self):
        """This process ends normally: the others stop watching it."""
        if self.state == "running":
            self._publish_quickly("exited")

    def at_exit(self):
        if self.crashed:
            self.stop(f"process {self.me} of {self.count} stopped with the error above; the other processes stop too.",
                      own_error=True)
        self.leave()
