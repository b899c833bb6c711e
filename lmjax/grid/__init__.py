"""Grids of runs: `python -m lmjax.grid GRID.py` runs a cartesian product of config overrides.

    from lmjax.grid import load_grid, run_local, run_status
    grid = load_grid("experiments/facts_capacity/grid.py")
    report = run_local(grid, parallel=2)        # resumes: done runs are skipped
    {run.name: run_status(run) for run in grid.runs}

Modules: spec.py (grid file -> runs), status.py (a run's status from its folder), local.py (the
local runner), table.py (progress table), slurm.py and multihost.py (cluster script writers).
"""
from lmjax.grid.local import Report, run_local
from lmjax.grid.multihost import write_multihost
from lmjax.grid.slurm import write_slurm
from lmjax.grid.spec import Grid, GridError, Run, format_value, load_grid, run_name
from lmjax.grid.status import run_status

__all__ = [
    "Grid", "GridError", "Report", "Run", "format_value", "load_grid", "run_local", "run_name", "run_status",
    "write_multihost", "write_slurm",
]
