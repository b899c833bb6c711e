"""A damaged checkpoint (lmjax/run_dir.py): found before it is restored, named in one line, and
passed over for the newest intact step, by training (which then ends exactly like an
uninterrupted run), generation, recall and export; asked for by its step, it is a one-line error."""
import json
import shutil

import pytest
from conftest import tiny_facts_config
from test_train import assert_same_state, metric_rows, saved_state

from lmjax import run_dir
from lmjax.train.loop import train

# Checkpoints at steps 4, 8 and 12 (saved synchronously: each is sealed at once).


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted run of 12 steps: the reference, and the run the damage is done to."""
    workdir = tmp_path_factory.mktemp("full")
    train(tiny_facts_config(), workdir)
    return workdir


def largest_data_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in p.as_posix()), key=lambda p: p.stat().st_size)


def truncate(step_dir):
    path = largest_data_file(step_dir)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    return f"{path.relative_to(step_dir.parent.parent).as_posix()} has {size // 2:,} of {size:,} bytes"


def delete_file(step_dir):
    path = step_dir / "state" / "_METADATA"
    path.unlink()
    return f"{path.relative_to(step_dir.parent.parent).as_posix()} is missing"


def flip_bytes(step_dir):
    path = largest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return f"{path.relative_to(step_dir.parent.parent).as_posix()} does not match its sha256"


def unfinished_save(step_dir):
    """What a save cut short leaves when its marker commits it (orbax on GCS): the state written,
    the data position not yet, no commit marker and no checksums."""
    for name in ("commit_success.txt", "lmjax_checksums.json"):
        (step_dir / name).unlink(missing_ok=True)  # (no checksums before lmjax wrote them)
    shutil.rmtree(step_dir / "data")
    return f"checkpoints/{step_dir.name}/commit_success.txt is missing: its save never finished"


DAMAGE = {"truncated file": truncate, "missing file": delete_file, "flipped bytes": flip_bytes, "no commit marker": unfinished_save}


def damaged_copy(full, tmp_path, damage, steps=(12,)):
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)
    reasons = [DAMAGE[damage](workdir / "checkpoints" / str(step)) for step in steps]
    return workdir, reasons


@pytest.mark.parametrize("damage", DAMAGE)
def test_each_kind_of_damage_is_found_named_and_passed_over(full, tmp_path, damage):
    """Without training: what the resume below meets, for every kind of damage."""
    workdir, [reason] = damaged_copy(full, tmp_path, damage)
    checkpoints = workdir / "checkpoints"
    assert run_dir.checkpoint_damage(checkpoints / "12").startswith(reason)
    assert run_dir.checkpoint_damage(checkpoints / "8") is None
    assert run_dir.newest_intact_step(checkpoints, [4, 8, 12]) == (8, [(12, run_dir.checkpoint_damage(checkpoints / "12"))])


# One kind of damage trains to the end in the default run; the others take the same path once
# found (the test above), ~12 s of training each, in the slow run.
@pytest.mark.parametrize("damage", [
    pytest.param(damage, marks=() if damage == "no commit marker" else pytest.mark.slow) for damage in DAMAGE
])
def test_resume_passes_over_a_damaged_latest_checkpoint_and_ends_like_an_uninterrupted_run(full, tmp_path, damage, capsys):
    workdir, [reason] = damaged_copy(full, tmp_path, damage)
    capsys.readouterr()

    summary = train(tiny_facts_config(), workdir)

    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"lmjax: warning: checkpoint 12 is damaged ({reason}")
    assert line.endswith("; set aside as checkpoints/12.damaged; resuming from step 8.")
    assert summary["step"] == 12
    assert_same_state(saved_state(full, 12), saved_state(workdir, 12))  # trained again from step 8
    assert metric_rows(full) == metric_rows(workdir)
    assert run_dir.checkpoint_damage(workdir / "checkpoints" / "12") is None
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "12.damaged", "4", "8"]


def test_generate_recall_and_export_use_the_newest_intact_step_or_fail_in_one_line_when_asked_for_the_damaged_one(full, tmp_path, capsys):
    from lmjax.eval.recall import main as recall_main
    from lmjax.export import main as export_main
    from lmjax.generate.__main__ import main as generate_main
    from lmjax.interop.consolidated import load_consolidated, read_params_json
    from test_run_dir import assert_bit_identical

    workdir, [reason] = damaged_copy(full, tmp_path, "truncated file")
    capsys.readouterr()
    _, _, params, step = run_dir.restore_params(workdir)
    assert step == 8
    assert_bit_identical(params, run_dir.restore_params(full, 8)[2])
    warning = f"lmjax: warning: checkpoint 12 is damaged ({reason}); using step 8."
    assert capsys.readouterr().err.splitlines() == [warning]

    assert export_main(["--workdir", str(workdir), "--out", str(tmp_path / "export")]) == 0
    assert read_params_json(tmp_path / "export")["step"] == 8
    assert_bit_identical(load_consolidated(tmp_path / "export")[1], params)
    assert generate_main(["--workdir", str(workdir), "--prompt", "hi", "--max_new_tokens", "2", "--lanes", "1"]) == 0
    assert capsys.readouterr().err.splitlines() == [warning, warning]

    asked = ["--workdir", str(workdir), "--step", "12"]
    assert export_main([*asked, "--out", str(tmp_path / "export12")]) == 2
    assert generate_main([*asked, "--prompt", "hi", "--max_new_tokens", "2", "--lanes", "1"]) == 2
    assert recall_main([*asked, "--limit", "1", "--lanes", "1"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": error: ")[0] for line in lines] == ["lmjax.export", "lmjax.generate", "lmjax.eval.recall"]
    for line in lines:
        assert f": error: Checkpoint 12 of {str(workdir)!r} is damaged ({reason}); pick another --step" in line
    assert not (tmp_path / "export12").exists()
    assert (workdir / "checkpoints" / "12").is_dir()  # readers never move anything


def test_no_intact_checkpoint_left_is_one_error_that_names_them_all(full, tmp_path):
    workdir, reasons = damaged_copy(full, tmp_path, "flipped bytes", steps=(4, 8, 12))
    with pytest.raises(ValueError) as error:
        train(tiny_facts_config(), workdir)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"Every checkpoint of {str(workdir)!r} is damaged (12: ")
    assert all(reason in message for reason in reasons) and "restore checkpoints/ from a copy" in message
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "4", "8"]  # nothing moved
    with pytest.raises(ValueError, match="Every checkpoint of"):
        run_dir.restore_params(workdir)


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_async_saves_are_sealed_once_finished_and_unsealed_steps_are_trusted(tmp_path):
    """With async saves each step gets its checksums at the next save or at the end; a step
    without them (a run from before they existed) is trusted as orbax committed it."""
    train(tiny_facts_config(**{"checkpoint.async_save": True}), tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert steps == [4, 8, 12]
    for step in steps:
        step_dir = tmp_path / "checkpoints" / str(step)
        files = json.loads((step_dir / run_dir.CHECKSUMS_FILE).read_text())["files"]
        assert set(files) == {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()} - {run_dir.CHECKSUMS_FILE}
        assert run_dir.checkpoint_damage(step_dir) is None

    old = tmp_path / "checkpoints" / "12"
    (old / run_dir.CHECKSUMS_FILE).unlink()
    flip_bytes(old)
    assert run_dir.checkpoint_damage(old) is None  # nothing to check it against
    (old / run_dir.CHECKSUMS_FILE).write_text("{not json")
    assert run_dir.checkpoint_damage(old).startswith("checkpoints/12/lmjax_checksums.json is unreadable (")

