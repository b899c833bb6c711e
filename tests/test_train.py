"""End-to-end training: outputs contract, determinism, exact resume (also after a kill), SIGTERM."""
import json
import shutil
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, build_task, cli, tiny_facts_config, tiny_facts_overrides
from lmjax.train.loop import train

TIMING_KEYS = ("time/recall_s", "train/tokens_per_s", "train/step_time_s", "time/since_start_s")
TIMED_PERF_KEYS = ("perf/flops_limit", "perf/flops_per_s", "perf/mfu")  # measured: they vary run to run


def metric_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS + TIMED_PERF_KEYS} for r in rows]


def saved_state(workdir, step):
    tree = ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "state").absolute())
    return {"/".join(map(str, path)): np.asarray(leaf) for path, leaf in _flatten(tree)}


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flatten(v, prefix + (i,))
    else:
        yield prefix, tree


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_run_writes_the_output_contract_and_learns(tmp_path):
    config = tiny_facts_config(**{"train.steps": 60, "train.eval_every": 30, "checkpoint.every": 30})
    summary = train(config, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["dim"] == 32
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r for r in rows)
    train_rows = [r for r in rows if "train/loss" in r]
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "train/step_time_s"):
        assert key in train_rows[-1]
    assert train_rows[-1]["train/loss"] < 0.6 * train_rows[0]["train/loss"]
    assert any("eval/qa_acc" in r for r in rows)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert summary["step"] == 60 and not summary["interrupted"]
    assert (tmp_path / "checkpoints" / "60").is_dir()


@pytest.fixture(scope="module")
def same_seed_runs(tmp_path_factory):
    """Two runs of the same tiny config, each trained from scratch in its own folder (shared by
    the determinism and resume tests below; neither test writes into them)."""
    root = tmp_path_factory.mktemp("same_seed")
    for name in ("a", "b"):
        train(tiny_facts_config(), root / name)
    return root / "a", root / "b"


def test_same_seed_same_numbers_other_seed_differs(same_seed_runs, tmp_path):
    a, b = same_seed_runs
    train(tiny_facts_config(seed=1), tmp_path / "c")
    assert metric_rows(a) == metric_rows(b)
    assert metric_rows(a) != metric_rows(tmp_path / "c")


@pytest.mark.slow  # a second training run; block skipping's exactness is tested on the model in test_transformer.py
def test_block_skipping_trains_like_the_full_attention(tmp_path):
    """Rows of 192 packed with ~70-token dialogs, blocks of 16: the loop's longest-sequence promise
    leaves out most keys, and the losses match the unblocked run's up to f32 summation order."""
    overrides = {"train.seq_len": 192, "train.steps": 8, "train.eval_every": 8}
    train(tiny_facts_config(**overrides, **{"model.attention_block": 0}), tmp_path / "full")
    train(tiny_facts_config(**overrides, **{"model.attention_block": 16}), tmp_path / "blocked")
    full, blocked = (
        [r for r in metric_rows(tmp_path / name) if "train/loss" in r or "eval/qa_loss" in r] for name in ("full", "blocked")
    )
    assert len(full) == len(blocked) > 0
    for a, b in zip(full, blocked):
        for key in ("train/loss", "train/grad_norm", "eval/qa_loss"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)
    longest = max(len(e["inputs"]) for e in build_task(tiny_facts_config(), tmp_path / "data").train)
    assert f"longest sequence {longest})" in json.loads((tmp_path / "blocked" / "step_cost.json").read_text())["analytic_counts"]


def test_resume_from_checkpoint_is_bit_identical(same_seed_runs, tmp_path):
    full, other = same_seed_runs
    resumed = tmp_path / "resumed"
    shutil.copytree(other, resumed)  # a second uninterrupted run, so the resume is compared with a run it did not start from
    # Forget everything after step 4, as if the run had died there, then rerun the same command.
    for step in (8, 12):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    summary = train(tiny_facts_config(), resumed)
    assert summary["step"] == 12
    assert_same_state(saved_state(full, 12), saved_state(resumed, 12))
    assert metric_rows(full) == metric_rows(resumed)


def _overrides_argv(**extra):
    return [f"--config.{k}={v}" for k, v in tiny_facts_overrides(**extra).items()]


def _wait_for_checkpoint(workdir, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (workdir / "checkpoints" / str(step)).is_dir():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {step} after {timeout}s")


@pytest.mark.slow  # heavy end-to-end; resume is also tested in-process above and by experiments/fault_injection.py
def test_resume_after_kill_is_bit_identical(tmp_path, subprocess_env):
    args = ["--config=" + str(ROOT / "configs" / "facts.py"), *_overrides_argv(**{"train.steps": 60, "checkpoint.every": 10})]
    subprocess.run(cli(*args, f"--workdir={tmp_path / 'full'}"), env=subprocess_env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(*args, f"--workdir={killed}"), env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(killed, 20, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "60").exists(), "the run finished before it could be killed"
    subprocess.run(cli(*args, f"--workdir={killed}"), env=subprocess_env, check=True, capture_output=True)
    assert_same_state(saved_state(tmp_path / "full", 60), saved_state(killed, 60))
    assert metric_rows(tmp_path / "full") == metric_rows(killed)


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, subprocess_env):
    args = ["--config=" + str(ROOT / "configs" / "facts.py"), *_overrides_argv(**{"train.steps": 100000, "checkpoint.every": 1000})]
    proc = subprocess.Popen(cli(*args, f"--workdir={tmp_path}"), env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").exists() or "train/loss" not in (tmp_path / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped at step" in out
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 1000


@pytest.mark.slow  # heavy end-to-end; resume is also tested in-process above and by experiments/fault_injection.py
def test_wandb_offline_run_is_written_and_resumed_under_the_same_id(tmp_path):
    config = tiny_facts_config(**{"logging.wandb.mode": "offline", "train.steps": 4})
    train(config, tmp_path)
    run_id = (tmp_path / "wandb_id").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs, list((tmp_path / "wandb").iterdir())
    config = tiny_facts_config(**{"logging.wandb.mode": "offline", "train.steps": 8})
    train(config, tmp_path)
    assert (tmp_path / "wandb_id").read_text().strip() == run_id


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_tool_mode_trains_on_tool_dialogs_and_reports_unseen_people(tmp_path):
    from lmjax.data.tokenizers.byte import ByteTokenizer

    database = ByteTokenizer().special_id("database")
    tool = build_task(tiny_facts_config(**{"data.mode": "tool", "train.seq_len": 160}), tmp_path / "tool")
    weights = build_task(tiny_facts_config(), tmp_path / "weights")
    assert all(database in e["inputs"] for e in tool.train)
    assert not any(database in e["inputs"] for e in weights.train)
    def eval_rows(task):
        (teacher_forced,) = task.evaluators  # eval.recall is off in the tiny config
        return {name: sum(n_real for _, n_real in batches) for name, batches in teacher_forced.batches.items()}

    assert eval_rows(tool) == {"qa": 8 * 4, "qa_unseen": 4 * 4} and eval_rows(weights) == {"qa": 8 * 4}
    summary = train(tiny_facts_config(**{"data.mode": "tool", "train.seq_len": 160, "train.steps": 6}), tmp_path / "run")
    assert {"eval/qa_acc", "eval/qa_unseen_acc"} <= set(summary)


@pytest.mark.slow  # 29 s; tests/test_config.py checks the same rule without training
def test_resuming_with_a_different_model_is_a_clear_error(tmp_path):
    from lmjax.registry import ConfigError

    train(tiny_facts_config(**{"train.steps": 4}), tmp_path)
    with pytest.raises(ConfigError, match=r"model.dim \(32 -> 64\)"):
        train(tiny_facts_config(**{"model.dim": 64}), tmp_path)
    # Changing only the length of training (or logging) resumes.
    assert train(tiny_facts_config(**{"train.steps": 6}), tmp_path)["step"] == 6
    # So does a run saved before model.attention_block existed (same arithmetic up to f32 order).
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["attention_block"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert train(tiny_facts_config(**{"train.steps": 8}), tmp_path)["step"] == 8


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_bio_mode_trains_on_biographies_and_reports_stored_bits(tmp_path):
    from lmjax.data.tokenizers.byte import ByteTokenizer

    user = ByteTokenizer().special_id("user")
    bio = build_task(tiny_facts_config(**{"data.mode": "bio", "train.seq_len": 192}), tmp_path / "bio")
    assert len(bio.train) == 8 and not any(user in e["inputs"] for e in bio.train)
    assert all(e["loss_mask"].all() for e in bio.train)  # the whole biography is the text to learn
    (stored,) = bio.evaluators
    assert {name: sum(n for _, n in batches) for name, batches in stored.batches.items()} == {
        "birth_date": 8, "birth_place": 8, "current_address": 8, "occupation": 8}
    summary = train(tiny_facts_config(**{"data.mode": "bio", "train.seq_len": 192, "train.steps": 6, "train.stop_when": ""}),
                    tmp_path / "run")
    assert {"eval/bio_acc", "eval/bio_bits", "eval/bio_loss", "eval/bio_occupation_bits"} <= set(summary)
    weights = build_task(tiny_facts_config(**{"data.stored_bits": True}), tmp_path / "weights")
    assert "eval/qa_bits" in weights.evaluators[-1].metric_names()
