"""Asynchronous evaluation: every saved checkpoint evaluated outside the training process.

    python -m lmjax.eval.follow --workdir W --tasks facts_recall [--until trainer|finished]

With `eval.async_tasks` set, the trainer (process 0) starts this follower beside itself, detached,
and never waits for it. The follower watches W/checkpoints/ for committed steps and evaluates each,
in increasing order, with `python -m lmjax.eval --workdir W --step S --tasks T` as a child process,
which writes W/eval/S/results.json and appends its row {"step": S, "eval/...": ...} to
metrics.jsonl. On a cluster the follower is a job of its own (lmjax.grid.slurm), and the trainer
only records itself (LMJAX_EVAL_FOLLOWER=external).

An eval that crashes, is killed or exits without results is reported (a line in W/eval/follow.log,
its attempts in W/eval/S/failed.json, its output in W/eval/S/eval.log) and run again `retries`
times, then skipped (failed.json: "skipped": true); a bad-input exit (status 2) is skipped at once.
Nothing the follower does reaches the trainer: training never waits and never stops for it.

Checkpoint rotation (`checkpoint.keep`) keeps a step until it is evaluated or skipped
(`settled`, the trainer's Checkpointer `keep_also`). The follower exits when training has ended
(W/eval/trainer.json says so, or the trainer's process is gone) and every committed step is
settled; then, if the run finished, it deletes the evaluated steps rotation kept only for it.

    W/eval/trainer.json   the trainer: pid, host, start; "ended" and "finished" when it stops
    W/eval/follower.json  the follower last started: pid, its process start time
    W/eval/follow.lock    held by the running follower (one per run folder; a second one waits)
    W/eval/current.json   the eval in progress: step, attempt, pid
    W/eval/follow.log     one line per event

Tests and benchmarks replace the eval command with LMJAX_EVAL_COMMAND, a command line whose
{workdir}, {step}, {tasks} and {attempt} are filled in. This module imports no JAX: the follower
starts in a fraction of a second and holds no accelerator.
"""
import argparse
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

CHECKPOINTS = "checkpoints"  # lmjax.run_dir.CHECKPOINTS (not imported: lmjax.run_dir imports JAX)
COMMIT_MARKER = "commit_success.txt"  # lmjax.run_dir.COMMIT_MARKER
EVAL_DIR = "eval"
RESULTS, FAILED, EVAL_LOG = "results.json", "failed.json", "eval.log"
TRAINER, FOLLOWER, LOCK, CURRENT, LOG = "trainer.json", "follower.json", "follow.lock", "current.json", "follow.log"
COMMAND_ENV = "LMJAX_EVAL_COMMAND"
NICE_ENV = "LMJAX_EVAL_NICE"  # the follower's --nice default (the trainer passes its environment on)
EXTERNAL_ENV = "LMJAX_EVAL_FOLLOWER"  # "external": a job of its own follows the run; the trainer starts none
BAD_INPUT = 2  # the eval CLI's exit status for bad input: running it again gives the same answer
LOG_TAIL_LINES = 8


# -- the run folder's eval files ----------------------------------------------------------------------

def eval_dir(workdir) -> Path:
    return Path(workdir) / EVAL_DIR


def committed_steps(workdir) -> list:
    """Steps of W/checkpoints/ whose save orbax committed (its marker is in the step folder), in order."""
    folder = Path(workdir) / CHECKPOINTS
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    return sorted(int(e.name) for e in entries if e.name.isdigit() and os.path.isfile(os.path.join(e.path, COMMIT_MARKER)))


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path, value):
    """Written under another name, then renamed: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def step_status(workdir, step) -> str:
    """done (results.json), skipped (failed for good), failed (to be retried) or pending."""
    folder = eval_dir(workdir) / str(step)
    if (folder / RESULTS).is_file():
        return "done"
    failed = _read_json(folder / FAILED)
    if failed is not None:
        return "skipped" if failed.get("skipped") else "failed"
    return "pending"


def settled(workdir, step) -> bool:
    """Whether checkpoint `step` needs no evaluation any more (done or skipped): rotation may delete it."""
    return step_status(workdir, step) in ("done", "skipped")


def unevaluated(workdir, step) -> bool:
    """The trainer's Checkpointer `keep_also`: keep checkpoint `step` until it is settled."""
    return not settled(workdir, step)


def statuses(workdir) -> dict:
    """{step: status} for every committed step and every step with eval files."""
    folder = eval_dir(workdir)
    evaluated = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return {step: step_status(workdir, step) for step in sorted(set(committed_steps(workdir)) | set(evaluated))}


def _log(workdir, message):
    """A line in W/eval/follow.log, and on stdout unless stdout is that file (a follower the trainer started)."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
    path = eval_dir(workdir) / LOG
    with open(path, "a") as f:
        f.write(line + "\n")
    try:
        same = os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(path))
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        print(line, flush=True)


# -- the trainer's side -------------------------------------------------------------------------------

def _process_id(pid):
    try:
        return {"pid": pid, "pid_created": psutil.Process(pid).create_time()}
    except psutil.Error:
        return {"pid": pid, "pid_created": None}


def _alive(record) -> bool:
    """Whether the process `record` names (pid, pid_created, host) is still running on this host."""
    if not record or record.get("host", socket.gethostname()) != socket.gethostname():
        return False
    try:
        process = psutil.Process(record["pid"])
        same = record.get("pid_created") is None or abs(process.create_time() - record["pid_created"]) < 1e-3
        return same and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError):
        return False


class TrainerSide:
    """What the trainer does for asynchronous evaluation (process 0 only): record itself in
    W/eval/trainer.json, forget the evals of steps a resume will save again, start the follower
    (unless a job of its own follows the run), restart it if it dies while training goes on, and
    record the end of training. Nothing here waits for an evaluation."""

    MAX_RESTARTS = 3

    def __init__(self, workdir, tasks: str, resumed_from, *, platforms: str = "", launch=None):
        self.workdir, self.tasks, self.platforms = Path(workdir).absolute(), tasks, platforms
        self.launch = os.environ.get(EXTERNAL_ENV) != "external" if launch is None else launch
        self.proc, self.restarts = None, 0
        folder = eval_dir(self.workdir)
        folder.mkdir(parents=True, exist_ok=True)
        # Evals of steps after the one training resumes from came from checkpoints that are gone
        # (damaged, or never committed); those steps are saved and evaluated again.
        for path in folder.iterdir():
            if path.name.isdigit() and (resumed_from is None or int(path.name) > resumed_from):
                shutil.rmtree(path, ignore_errors=True)
        _write_json(folder / TRAINER, {**_process_id(os.getpid()), "host": socket.gethostname(), "started": time.time()})
        if self.launch:
            self._start()

    def _start(self):
        self.proc = start_follower(self.workdir, self.tasks, platforms=self.platforms)

    def check(self):
        """Between steps: a follower that died (killed, a bug) while training goes on is started again."""
        if self.proc is None or self.proc.poll() is None:
            return
        code = self.proc.returncode
        if self.restarts >= self.MAX_RESTARTS:
            return
        self.restarts += 1
        print(f"lmjax: warning: the eval follower exited with status {code} during training; starting it again "
              f"({self.restarts}/{self.MAX_RESTARTS}; see {eval_dir(self.workdir) / LOG}).", file=sys.stderr, flush=True)
        self._start()

    def ended(self, finished: bool):
        """Training stopped (`finished`: reached its last step or stop_when, not interrupted)."""
        path = eval_dir(self.workdir) / TRAINER
        record = _read_json(path) or {}
        _write_json(path, {**record, "ended": time.time(), "finished": bool(finished)})


def start_follower(workdir, tasks: str, *, platforms: str = "", until: str = "trainer", extra=()) -> subprocess.Popen:
    """Start `python -m lmjax.eval.follow` detached (its own session; output to W/eval/follow.log) and
    record it in W/eval/follower.json; returns at once."""
    import lmjax

    workdir = Path(workdir).absolute()
    folder = eval_dir(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    source_root = str(Path(lmjax.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "lmjax.eval.follow", "--workdir", str(workdir), "--tasks", tasks, "--until", until, *extra]
    if platforms:
        command += ["--platforms", platforms]
    with open(folder / LOG, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)  # a Ctrl-C at the terminal stops the trainer, not its evals
    _write_json(folder / FOLLOWER, {**_process_id(proc.pid), "host": socket.gethostname()})
    return proc


def wait(workdir, timeout: float = 600.0, poll_s: float = 0.1) -> dict:
    """Wait until no follower of the run is running; returns `statuses(workdir)`. TimeoutError after
    `timeout` seconds. (Training never calls this; tests and scripts that read the evals do.)"""
    folder = eval_dir(workdir)
    deadline = time.time() + timeout
    while True:
        running = _alive(_read_json(folder / FOLLOWER)) or _lock_held(folder / LOCK)
        if not running:
            return statuses(workdir)
        if time.time() > deadline:
            raise TimeoutError(f"the eval follower of {workdir} is still running after {timeout:.0f} s (see {folder / LOG}).")
        time.sleep(poll_s)


def _lock_held(path) -> bool:
    if not path.exists():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


# -- the follower ---------------------------------------------------------------------------------------

def eval_command(workdir, step, tasks, attempt) -> list:
    """argv of one evaluation: the eval CLI, or LMJAX_EVAL_COMMAND with its fields filled in."""
    template = os.environ.get(COMMAND_ENV)
    if not template:
        return [sys.executable, "-m", "lmjax.eval", "--workdir", str(workdir), "--step", str(step), "--tasks", tasks,
                "--no_progress"]
    fields = {"workdir": str(workdir), "step": str(step), "tasks": tasks, "attempt": str(attempt)}
    return [part.format(**fields) for part in shlex.split(template)]


def _die_with_parent():
    """In the eval child (Linux): killed with the follower, so a follower killed mid-eval leaves no
    eval running beside the one that takes over."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _how_it_ended(code) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _tail(path, start) -> list:
    with open(path, "rb") as f:
        f.seek(start)
        return [line for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()][-LOG_TAIL_LINES:]


class Follower:
    """Evaluates the committed steps of one run folder, in order, each in a child process."""

    def __init__(self, workdir, tasks, *, until="trainer", retries=1, poll_s=1.0, eval_timeout=None,
                 idle_timeout=None, platforms=""):
        self.workdir, self.tasks, self.until = Path(workdir).absolute(), tasks, until
        self.retries, self.poll_s, self.eval_timeout, self.idle_timeout = retries, poll_s, eval_timeout, idle_timeout
        self.platforms = platforms
        self.folder = eval_dir(self.workdir)
        self.child = None
        self.stopping = False

    # - when to stop -
    def _training_over(self) -> bool:
        trainer = _read_json(self.folder / TRAINER)
        if self.until == "finished":  # a job of its own: the trainer may run elsewhere and be requeued
            return bool(trainer and trainer.get("finished"))
        if trainer is None:
            return False
        return "ended" in trainer or not _alive(trainer)

    def _env(self, attempt):
        env = dict(os.environ, LMJAX_EVAL_ATTEMPT=str(attempt), PYTHONUNBUFFERED="1")
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with the trainer
        if self.platforms:
            env["JAX_PLATFORMS"] = self.platforms
        return env

    # - one step -
    def evaluate(self, step) -> str:
        """Run the eval of `step` until it succeeds or its attempts are spent; returns its status."""
        folder = self.folder / str(step)
        folder.mkdir(parents=True, exist_ok=True)
        failed = _read_json(folder / FAILED) or {"step": step, "tasks": self.tasks, "attempts": [], "skipped": False}
        while len(failed["attempts"]) <= self.retries and not self.stopping:
            attempt = len(failed["attempts"]) + 1
            start = time.time()
            error = self._run(step, attempt, folder)
            if self.stopping and error is not None:  # stopped by SIGTERM: not the eval's failure
                _log(self.workdir, f"step {step}: eval stopped (attempt {attempt}); left for the next follower")
                break
            if error is None:
                _log(self.workdir, f"step {step}: evaluated in {time.time() - start:.1f} s" + (f" (attempt {attempt})" if attempt > 1 else ""))
                return "done"
            failed["attempts"].append(error)
            failed["skipped"] = error["exit_code"] == BAD_INPUT or len(failed["attempts"]) > self.retries
            _write_json(folder / FAILED, failed)
            then = "skipped" if failed["skipped"] else "will retry"
            last = error["log_tail"][-1] if error["log_tail"] else ""
            _log(self.workdir, f"step {step}: eval {error['how']} after {error['seconds']:.1f} s (attempt {attempt}); "
                               f"{then}; see {folder / EVAL_LOG}" + (f": {last}" if last else ""))
            if failed["skipped"]:
                return "skipped"
        return step_status(self.workdir, step)

    def _run(self, step, attempt, folder):
        """One attempt; None when it wrote its results, else what went wrong."""
        command = eval_command(self.workdir, step, self.tasks, attempt)
        start = time.time()
        with open(folder / EVAL_LOG, "ab") as log:
            log.write(f"=== lmjax.eval.follow {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {attempt}: {shlex.join(command)}\n".encode())
            log.flush()
            log_start = log.tell()
            self.child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self._env(attempt), preexec_fn=_die_with_parent)
            _write_json(self.folder / CURRENT, {"step": step, "attempt": attempt, **_process_id(self.child.pid)})
            try:
                code = self.child.wait(timeout=self.eval_timeout)
                how = _how_it_ended(code)
            except subprocess.TimeoutExpired:
                self.child.kill()
                code = self.child.wait()
                how = f"timed out after {self.eval_timeout:.0f} s (killed)"
        self.child = None
        (self.folder / CURRENT).unlink(missing_ok=True)
        if code == 0 and (folder / RESULTS).is_file():
            return None
        if code == 0:
            how = f"exited with status 0 but wrote no {RESULTS}"
        return {"attempt": attempt, "exit_code": code, "how": how, "seconds": round(time.time() - start, 2),
                "log_tail": _tail(folder / EVAL_LOG, log_start)}

    # - the loop -
    def run(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log(self.workdir, f"follower {os.getpid()}: another follower is running; waiting for it")
                fcntl.flock(lock, fcntl.LOCK_EX)
            return self._follow()

    def _follow(self) -> int:
        _log(self.workdir, f"follower {os.getpid()}: following {self.workdir} (tasks {self.tasks}, until {self.until})")
        counts = {"done": 0, "skipped": 0}
        given_up = set()  # failed steps not to try again in this follower (stopping)
        last_news = time.time()
        while not self.stopping:
            over = self._training_over()  # read before the scan: a step committed before the end is seen
            todo = [s for s in committed_steps(self.workdir) if s not in given_up and not settled(self.workdir, s)]
            if todo:
                status = self.evaluate(todo[0])
                if status in counts:
                    counts[status] += 1
                else:
                    given_up.add(todo[0])
                last_news = time.time()
                continue
            if over:
                break
            if self.idle_timeout and time.time() - last_news > self.idle_timeout:
                _log(self.workdir, f"follower {os.getpid()}: nothing new for {self.idle_timeout:.0f} s; exiting")
                break
            time.sleep(self.poll_s)
        if not self.stopping and self._training_over():
            self._prune()
        _log(self.workdir, f"follower {os.getpid()}: exiting; {counts['done']} evaluated, {counts['skipped']} skipped"
                           + (" (stopped)" if self.stopping else ""))
        return 0

    def _prune(self):
        """After a finished run: delete the settled steps that rotation kept only for their eval."""
        trainer = _read_json(self.folder / TRAINER) or {}
        config = _read_json(self.workdir / "config.json") or {}
        keep = config.get("checkpoint", {}).get("keep")
        if not (trainer.get("finished") and "ended" in trainer) or not isinstance(keep, int) or keep < 1:
            return  # an interrupted run resumes: its trainer's rotation deletes them at its next save
        steps = committed_steps(self.workdir)
        for step in steps[:-keep]:
            if settled(self.workdir, step):
                source = self.workdir / CHECKPOINTS / str(step)
                aside = source.with_name(f".{step}.deleting")
                os.replace(source, aside)  # gone at once for readers, then removed
                shutil.rmtree(aside, ignore_errors=True)
                _log(self.workdir, f"step {step}: checkpoint deleted (evaluated; checkpoint.keep={keep})")

    def stop(self, signum, frame):
        """SIGTERM/SIGINT: stop the eval in progress (it is retried by the next follower) and exit."""
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()


def parse_args(argv):
    from lmjax import cli

    p = cli.ArgumentParser(prog="lmjax.eval.follow", description="Evaluate every checkpoint a run saves, as it saves them.")
    p.add_argument("--workdir", required=True, help="the training run folder")
    p.add_argument("--tasks", required=True, help="comma-separated eval tasks (lmjax.eval.tasks)")
    p.add_argument("--until", choices=("trainer", "finished"), default="trainer",
                   help="trainer: exit when the trainer process ends; finished: when the run has finished (a job of its own)")
    p.add_argument("--retries", type=int, default=1, help="attempts after a crashed or killed eval (default 1)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between looks at the checkpoints folder")
    p.add_argument("--eval_timeout", type=float, default=None, help="kill an eval after this many seconds")
    p.add_argument("--idle_timeout", type=float, default=None, help="exit after this many seconds with nothing new")
    p.add_argument("--platforms", default="", help="JAX_PLATFORMS for the evals (e.g. cpu beside a TPU trainer)")
    # 0 by default: on the 2-core CPU, nice 10 made the trainer's steps slower, not faster (bench_async_eval.py)
    p.add_argument("--nice", type=int, default=int(os.environ.get(NICE_ENV, "0")),
                   help=f"lower the evals' CPU priority by this much (default ${NICE_ENV} or 0: as the trainer)")
    return p.parse_args(argv)


def _body(args):
    if args.retries < 0 or args.poll <= 0:
        raise ValueError("--retries must be 0 or more and --poll a positive number of seconds.")
    if args.nice:
        os.nice(args.nice)  # the evals inherit it
    follower = Follower(args.workdir, args.tasks, until=args.until, retries=args.retries, poll_s=args.poll,
                        eval_timeout=args.eval_timeout, idle_timeout=args.idle_timeout, platforms=args.platforms)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, follower.stop)
    return follower.run()


def main(argv=None) -> int:
    from lmjax import cli

    return cli.run("lmjax.eval.follow", parse_args, _body, argv)


if __name__ == "__main__":
    sys.exit(main())
