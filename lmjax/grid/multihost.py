"""A script that runs a grid's runs one after another, each across N hosts (one process per host).

ROOT/multihost/launch.sh is started on every host at once, with the same COORDINATOR (process 0's
host:port) and each host's PROCESS_ID (0..N-1):

    PROCESS_ID=0 COORDINATOR=10.0.0.1:1234 bash ROOT/multihost/launch.sh   # on host 0
    PROCESS_ID=1 COORDINATOR=10.0.0.1:1234 bash ROOT/multihost/launch.sh   # on host 1, ...

(or `bash launch.sh PROCESS_ID COORDINATOR`). For each run it sets JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, which lmjax.parallel.distributed reads when the config's
parallel.distributed keys are unset, skips the run if its summary.json says it finished (so a
rerun resumes), and appends the process's output to WORKDIR/grid_run.process<ID>.log. Run folders
must be on a filesystem every host sees.
"""
import shlex

from lmjax.grid.local import write_grid_json
from lmjax.grid.spec import GridError

_DONE = 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("interrupted") is not False)'


def write_multihost(grid, runs, *, hosts):
    """Write ROOT/multihost/launch.sh for `runs` on `hosts` processes; returns its path."""
    if not isinstance(hosts, int) or hosts < 1:
        raise GridError(f"--hosts must be a positive number of hosts, got {hosts!r}.")
    folder = grid.root / "multihost"
    folder.mkdir(parents=True, exist_ok=True)
    for run in runs:
        write_grid_json(grid, run)
    python = shlex.quote(runs[0].command[0]) if runs else "python"
    lines = [
        "#!/bin/bash",
        f"# lmjax.grid {grid.name}: {len(runs)} runs in sequence, each on {hosts} hosts. On every host:",
        f"#   PROCESS_ID=<0..{hosts - 1}> COORDINATOR=<host0:port> bash {folder / 'launch.sh'}",
        "set -uo pipefail",
        f'PROCESS_ID=${{1:-${{PROCESS_ID:?set PROCESS_ID to the index of this host, 0..{hosts - 1}}}}}',
        'COORDINATOR=${2:-${COORDINATOR:?set COORDINATOR to host:port of process 0}}',
        f"export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES={hosts} JAX_PROCESS_ID=$PROCESS_ID",
        "failed=0",
        "run() {",
        '  local workdir=$1; shift',
        f'  if {python} -c {shlex.quote(_DONE)} "$workdir/summary.json" 2>/dev/null; then',
        '    echo "lmjax.grid: done already: $workdir"; return',
        "  fi",
        '  echo "lmjax.grid: process $PROCESS_ID: $workdir"',
        '  "$@" 2>&1 | tee -a "$workdir/grid_run.process$PROCESS_ID.log"',
        '  local code=$?',
        '  if [ $code -ne 0 ]; then echo "lmjax.grid: failed (exit $code): $workdir"; failed=1; fi',
        "}",
        *(f"run {shlex.quote(str(run.workdir))} {shlex.join(run.command)}" for run in runs),
        'exit $failed',
    ]
    script = folder / "launch.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return script
