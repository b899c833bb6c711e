"""wandb: a resumed workdir continues its run; `python -m lmjax.monitor.sync` replays metrics.jsonl.

Everything runs offline (no network here) and is read back from the run's `.wandb` transaction
log. wandb 0.31 has no Python reader for it (the Go core reads it), so `read_wandb_log` below
follows the format wandb writes: a leveldb-style log (7-byte header ":W&B" + magic 0xBEE1 +
version 0, then 32 KiB blocks of records with a CRC-32 of type + data) of `Record` protobufs.
"""
import json
import math
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import wandb

from conftest import tiny_facts_config
from lmjax.monitor.sync import main as sync_main


def is_timing(name):
    """Metrics that measure the machine, not the model: they differ between an interrupted run and its resume."""
    return name.startswith("time/") or name.endswith(("_per_s", "_time_s")) or name == "perf/mfu"


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    """wandb quiet and writing nothing outside tmp_path (runs themselves go to WORKDIR/wandb*)."""
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def read_wandb_log(path):
    """The `Record` protobufs of a .wandb transaction log, in order."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = Path(path).read_bytes()
    assert struct.unpack("<4sHB", data[:header]) == (b":W&B", 0xBEE1, 0), "not a wandb transaction log"
    records, pending, i = [], b"", header
    while i + header <= len(data):
        if block - i % block < header:  # a block's tail too short for a header is zero padding
            i += block - i % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[i:i + header])
        if (crc, length, kind) == (0, 0, 0):
            break
        body = data[i + header:i + header + length]
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {i} of {path}"
        i += header + length
        pending += body
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE.../LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_folder):
    """[(step, {name: value})] logged to an offline run folder, without wandb's own _keys."""
    (log,) = Path(run_folder).glob("*.wandb")
    records = read_wandb_log(log)
    # The run's end; only wandb's `environment` records may come after it (they are written late).
    assert any(r.WhichOneof("record_type") == "exit" for r in records), f"{log} is incomplete: wandb.teardown() waits for it"
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append((row["_step"], {k: v for k, v in row.items() if not k.startswith("_")}))
    return rows


def wandb_run_record(run_folder):
    (log,) = Path(run_folder).glob("*.wandb")
    return next(r.run for r in read_wandb_log(log) if r.WhichOneof("record_type") == "run")


def jsonl_history(workdir):
    """metrics.jsonl as [(step, {name: float})], lines of one step merged: what wandb should hold."""
    rows = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row.pop("step"), {}).update({k: float(v) for k, v in row.items()})
    return sorted(rows.items())


def assert_same_history(got, expected, skip=lambda name: False):
    assert [step for step, _ in got] == [step for step, _ in expected]
    for (step, got_row), (_, want_row) in zip(got, expected):
        assert set(got_row) == set(want_row), step
        for name, want in want_row.items():
            if skip(name):
                continue
            if math.isnan(want):
                assert math.isnan(got_row[name]), (step, name)
            else:
                assert got_row[name] == want, (step, name)  # JSON round trips of floats are exact


def write_run(folder, lines, **wandb_config):
    folder.mkdir(parents=True)
    config = {"model": {"dim": 32}, "logging": {"wandb": {"mode": "disabled", "project": "lmjax-test", **wandb_config}}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


SYNTHETIC = [
    {"step": 0, "model/params": 1234},
    {"step": 2, "train/loss": 2.5, "train/lr": 0.001},
    {"step": 2, "eval/qa_acc": 0.125, "eval/qa_loss": 2.75},  # same step: one history row
    {"step": 4, "train/loss": "nan", "train/lr": 0.002},      # MetricWriter writes non-finite values as strings
    {"step": 6, "train/loss": 1.0, "train/grad_norm": "inf"},
]


def offline_folders(root, run_id):
    return sorted((Path(root) / "wandb").glob(f"offline-run-*-{run_id}"))


def test_sync_offline_writes_metrics_jsonl_as_the_run_history(tmp_path, capsys):
    run = write_run(tmp_path / "lr3e-3", SYNTHETIC)
    sync_main([str(run)])
    run_id = (run / "wandb_id").read_text()
    (folder,) = offline_folders(run / "wandb_sync", run_id)

    assert wandb_history(folder) == [
        (0, {"model/params": 1234.0}),
        (2, {"train/loss": 2.5, "train/lr": 0.001, "eval/qa_acc": 0.125, "eval/qa_loss": 2.75}),
        (4, {"train/loss": pytest.approx(float("nan"), nan_ok=True), "train/lr": 0.002}),
        (6, {"train/loss": 1.0, "train/grad_norm": float("inf")}),
    ]
    record = wandb_run_record(folder)
    assert (record.run_id, record.display_name, record.project) == (run_id, "lr3e-3", "lmjax-test")
    config = {item.key: json.loads(item.value_json) for item in record.config.update}
    assert config["model"] == {"dim": 32}
    assert (run / "wandb_step").read_text() == "6"  # a later resume will not send these steps again
    out = capsys.readouterr().out
    assert str(folder) in out and f"wandb sync {folder}" in out


def test_sync_finds_runs_under_a_grid_root_and_keeps_their_ids(tmp_path):
    grid = tmp_path / "grid"
    a = write_run(grid / "n8" / "seed0", SYNTHETIC[:2])
    b = write_run(grid / "n16" / "seed0", SYNTHETIC[:3], name="named-run")
    (grid / "plots").mkdir()  # not a run folder: ignored
    sync_main([str(grid)])
    ids = {run: (run / "wandb_id").read_text() for run in (a, b)}
    assert ids[a] != ids[b]

    sync_main([str(grid), str(a)])  # again, a named twice: each run once, same id, one folder per run
    for run in (a, b):
        assert (run / "wandb_id").read_text() == ids[run]
        (folder,) = offline_folders(run / "wandb_sync", ids[run])
        assert_same_history(wandb_history(folder), jsonl_history(run))
    assert wandb_run_record(offline_folders(b / "wandb_sync", ids[b])[0]).display_name == "named-run"


@pytest.mark.slow  # two training runs with wandb
def test_resumed_training_continues_the_wandb_run_without_stepping_back(tmp_path, capsys):
    """An interrupted run (checkpoint at 4, steps up to 6 logged) resumed: same run id, steps only increase."""
    workdir = tmp_path / "run"
    overrides = {"logging.wandb.mode": "offline", "logging.tensorboard": False}
    # Stops at the first eval (step 6) and checkpoints there; dropping that checkpoint leaves the
    # workdir as a kill after step 6 was logged but before it was saved would.
    first = tiny_facts_config(**overrides, **{"train.stop_when": "eval/qa_acc>=0"})
    assert lmjax_train(first, workdir)["step"] == 6
    shutil.rmtree(workdir / "checkpoints" / "6")
    lmjax_train(tiny_facts_config(**overrides), workdir)  # resumes from 4, re-runs 5.. 12
    wandb.teardown()  # run.finish() returns before wandb's service has written the run's files

    run_id = (workdir / "wandb_id").read_text()
    segments = offline_folders(workdir, run_id)
    assert len(segments) == 2  # one offline folder per process, both the same run id
    assert all(wandb_run_record(folder).run_id == run_id for folder in segments)
    first_rows, resumed_rows = (wandb_history(folder) for folder in segments)
    assert [step for step, _ in first_rows] == [0, 2, 4, 6]
    assert [step for step, _ in resumed_rows] == [8, 10, 12]  # step 6 was already sent: not sent again
    # Together they are metrics.jsonl (which dropped 5.. and logged them again); the re-run step 6
    # is bit-identical to the interrupted one except the timings.
    assert_same_history(first_rows + resumed_rows, jsonl_history(workdir), skip=is_timing)

    sync_main([str(workdir)])  # the whole history as one offline run with the same id
    (synced,) = offline_folders(workdir / "wandb_sync", run_id)
    assert_same_history(wandb_history(synced), jsonl_history(workdir))


def lmjax_train(config, workdir):
    from lmjax.train.loop import train

    return train(config, workdir)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("file", "is not a folder"),
    ("config_only", "has config.json but no metrics.jsonl"),
    ("empty", "holds no run folders"),
    ("bad_line", "metrics.jsonl:2 is not a JSON object with a \"step\""),
])
def test_sync_errors_are_one_line_with_status_2(tmp_path, capsys, case, message):
    path = tmp_path / case
    if case == "file":
        path.write_text("x")
    elif case == "config_only":
        path.mkdir()
        (path / "config.json").write_text("{}")
    elif case == "empty":
        path.mkdir()
    elif case == "bad_line":
        write_run(path, SYNTHETIC[:1])
        with open(path / "metrics.jsonl", "a") as f:
            f.write('{"train/loss": 1.0}\n')
    assert sync_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmjax.monitor.sync: error: ") and message in err
    assert not (path / "wandb_sync").exists()


def test_sync_command_line(tmp_path, subprocess_env):
    done = subprocess.run([sys.executable, "-m", "lmjax.monitor.sync", str(tmp_path / "nope")],
                          env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == f"lmjax.monitor.sync: error: {tmp_path / 'nope'} does not exist.\n"


def test_an_evaluation_row_reaches_metrics_jsonl_tensorboard_and_wandb_at_its_step(tmp_path):
    """lmjax.eval.record.append_metrics (what python -m lmjax.eval writes): the row with the
    checkpoint's step in metrics.jsonl, a TensorBoard event at that step, and in the run's wandb
    run with `eval/step`, its own x-axis (wandb would drop a step below the trainer's last)."""
    from types import SimpleNamespace

    from test_metric_writer import read_scalars

    from lmjax.config import Logging, Wandb
    from lmjax.eval.record import append_metrics
    from lmjax.monitor.metrics import wandb_run_id

    run_id, _ = wandb_run_id(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "train/loss": 2.0}\n')
    config = SimpleNamespace(logging=Logging(tensorboard=True, wandb=Wandb(mode="offline", project="lmjax-test")))
    append_metrics(tmp_path, config, 4, {"eval/qa_recall": 0.25})
    assert jsonl_history(tmp_path) == [(4, {"eval/qa_recall": 0.25}), (10, {"train/loss": 2.0})]
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    assert read_scalars(events) == [("eval/qa_recall", 4, 0.25)]
    (folder,) = offline_folders(tmp_path, run_id)
    assert [row for _, row in wandb_history(folder)] == [{"eval/qa_recall": 0.25, "eval/step": 4}]
