"""Two local processes (gloo collectives) train like one process, and save and resume together.

One process reading both input shards sees the same global batches as two processes reading
one shard each (lmjax.data.pipeline.InputShards), so the two runs must give the same losses up
to the order of the gradient all-reduce.
"""
import json
import subprocess

import numpy as np
import portpicker
import pytest

from conftest import cli, tiny_facts_overrides

pytestmark = pytest.mark.slow  # two training processes, ~35 s: run with -m slow (CI does)


def overrides(**extra):
    base = tiny_facts_overrides(**{"train.steps": 6, "train.log_every": 1, "train.eval_every": 3, "checkpoint.every": 3})
    base.update(extra)
    return [f"--config.{k}={v}" for k, v in base.items()]


def losses(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["train/loss"] for line in lines if "train/loss" in line}


def two_processes(workdir, env, steps, tmp_path):
    port = portpicker.pick_unused_port()
    procs = []
    for i in range(2):
        dist = {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": i, "init_timeout_s": 60}
        args = overrides(**{"train.steps": steps}) + [f"--config.parallel.distributed.{k}={v}" for k, v in dist.items()]
        log = open(tmp_path / f"process{i}-{steps}.log", "w")
        procs.append((subprocess.Popen(cli("--config=configs/facts.py", f"--workdir={workdir}", *args), env=env,
                                       stdout=log, stderr=subprocess.STDOUT, cwd=str(workdir.parents[0])), log))
    for proc, log in procs:
        assert proc.wait(timeout=300) == 0, (tmp_path / f"process{procs.index((proc, log))}-{steps}.log").read_text()[-3000:]
        log.close()


def test_two_processes_train_like_one_and_resume_from_their_checkpoint(tmp_path, subprocess_env):
    import shutil

    from conftest import ROOT

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    one = tmp_path / "one"
    done = subprocess.run(cli("--config=configs/facts.py", f"--workdir={one}", *overrides(**{"data.input_shards": 2})),
                          env=subprocess_env, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    two = tmp_path / "two"
    two_processes(two, subprocess_env, 3, tmp_path)  # steps 1-3, checkpoint at 3
    saved = sorted(p.name for p in (two / "checkpoints" / "3" / "data").glob("*.json"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]  # each process's own data position
    two_processes(two, subprocess_env, 6, tmp_path)  # resumes at 3, trains 4-6

    reference, got = losses(one), losses(two)
    assert sorted(got) == sorted(reference) == [1, 2, 3, 4, 5, 6]  # metrics written once (process 0)
    # f32; the two-process run sums gradients across processes in another order.
    np.testing.assert_allclose([got[s] for s in sorted(got)], [reference[s] for s in sorted(got)], rtol=0, atol=1e-5)
