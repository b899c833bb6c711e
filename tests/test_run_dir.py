"""lmjax/run_dir.py (a run's folder without the trainer) and lmjax/cli.py, on a real tiny run."""
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_facts_config

from lmjax import run_dir

# Checkpoints at steps 2 and 4, no evaluation (it would only add compile time).
RUN = {"train.steps": 4, "checkpoint.every": 2, "train.eval_every": 1000, "train.log_every": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny facts run (in the weights), as the trainer leaves it."""
    from lmjax.train.loop import train

    workdir = tmp_path_factory.mktemp("run")
    train(tiny_facts_config(**RUN), workdir)
    return workdir


def full_restore(workdir, step=None):
    """The whole train state restored with the run's optimizer, as training resumes it."""
    from lmjax.optim.optimizer import make_optimizer
    from lmjax.train.state import abstract_train_state, init_state_fn

    config = run_dir.read_run_config(workdir)
    model = run_dir.run_model(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    checkpointer = run_dir.Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, async_save=False)
    try:
        state, _ = checkpointer.restore(abstract_train_state(init_state_fn(model, tx, config.train.seq_len), config.seed), step, data=False)
    finally:
        checkpointer.close()
    return state


def assert_bit_identical(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), path
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path


@pytest.fixture
def arrays_read(monkeypatch):
    """Names ('params.embed.embedding', 'opt_state.0.0.mu...') of every value orbax deserializes."""
    names = []
    for handler in (ocp.type_handlers.ArrayHandler, ocp.type_handlers.NumpyHandler, ocp.type_handlers.ScalarHandler):
        def spy(self, infos, args=None, _deserialize=handler.deserialize):
            names.extend(info.name for info in infos)
            return _deserialize(self, infos, args)

        monkeypatch.setattr(handler, "deserialize", spy)
    return names


# -- parameters ---------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [None, 2])
def test_restore_params_reads_only_the_params_and_equals_the_full_restore(run, arrays_read, step):
    config, model, params, restored_step = run_dir.restore_params(run, step)
    assert restored_step == (4 if step is None else 2)
    assert arrays_read and all(name.startswith("params.") for name in arrays_read), arrays_read
    assert len(arrays_read) == len(jax.tree_util.tree_leaves(params))

    arrays_read.clear()
    state = full_restore(run, restored_step)
    assert any(name.startswith("opt_state.") for name in arrays_read)  # the spy sees what a full restore reads
    assert_bit_identical(params, state.params)
    assert all(leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0]) for leaf in jax.tree_util.tree_leaves(params))
    assert model.cfg.dim == config.model.dim == 32


def test_restore_params_needs_no_optimizer_state_on_disk(tmp_path):
    """A checkpoint whose optimizer state is nothing like Adam's still gives its parameters."""
    import flax.linen as nn
    import jax.numpy as jnp

    from lmjax.train.step import TrainState

    run_dir.write_run_config(tmp_path, tiny_facts_config(**RUN))
    model = run_dir.run_model(run_dir.read_run_config(tmp_path))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))["params"])
    junk = TrainState(step=jnp.array(7), params=params, opt_state={"not_adam": jnp.ones(5)}, rng=jax.random.PRNGKey(0))
    checkpointer = run_dir.Checkpointer(tmp_path / "checkpoints", keep=2, async_save=True)
    checkpointer.save(7, junk, {"position": 0})
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    assert_bit_identical(checkpointer.restore_params(abstract), params)  # the manager that saved it
    checkpointer.close()

    _, _, restored, step = run_dir.restore_params(tmp_path)
    assert step == 7
    assert_bit_identical(restored, params)
    with pytest.raises(ValueError):  # what the old path (restore everything with the run's optimizer) would do
        full_restore(tmp_path)


def test_restore_params_onto_a_layout(run):
    from lmjax.parallel.layout import Layout

    layout = Layout.single_device()
    _, _, params, _ = run_dir.restore_params(run, layout=layout)
    assert all(leaf.sharding.mesh == layout.mesh for leaf in jax.tree_util.tree_leaves(params))
    assert_bit_identical(params, full_restore(run).params)


@pytest.mark.parametrize("case, message", [
    ("no config", "has no config.json; point --workdir at a training run folder."),
    ("no checkpoint", "has no checkpoint yet; train first"),
    ("unknown step", "No checkpoint at step 3 in"),
])
def test_restore_params_errors(run, tmp_path, case, message):
    workdir, step = tmp_path, None
    if case == "no checkpoint":
        shutil.copy(run / "config.json", tmp_path / "config.json")
    elif case == "unknown step":
        workdir, step = run, 3
    with pytest.raises(ValueError, match=message):
        run_dir.restore_params(workdir, step)
    if case == "no checkpoint":
        assert not (tmp_path / "checkpoints").exists()


# -- config.json --------------------------------------------------------------------------------

def test_run_config_round_trip_leaves_no_temporary_file(tmp_path):
    config = tiny_facts_config(**RUN)
    run_dir.write_run_config(tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    again = run_dir.read_run_config(tmp_path)
    assert again.train.seq_len == config.train.seq_len and again.data.name == "facts"
    run_dir.write_run_config(tmp_path, again)  # overwrites in place
    assert run_dir.read_run_config(tmp_path).model.dim == config.model.dim


# -- tokenizer ------------------------------------------------------------------------------------

def trained_on(name):
    """A config as far as the tokenizer looks at it."""
    return SimpleNamespace(data=SimpleNamespace(name=name))


def test_run_tokenizer_without_a_saved_one_comes_from_the_config(run, tmp_path):
    from lmjax.data import shakespeare
    from lmjax.data.tokenizers.byte import ByteTokenizer

    assert (run / run_dir.TOKENIZER_FILE).is_file()  # training saves it
    old = tmp_path / "old_run"  # a run saved before tokenizer.json existed
    old.mkdir()
    (old / "config.json").write_text((run / "config.json").read_text())
    assert isinstance(run_dir.run_tokenizer(run_dir.read_run_config(old), old), ByteTokenizer)
    assert run_dir.run_tokenizer(trained_on("mqar"), tmp_path) is None
    # Runs saved before tokenizer.json: the characters of the whole text, as training built them.
    assert run_dir.run_tokenizer(trained_on("shakespeare"), tmp_path) == shakespeare.CharTokenizer.from_text(shakespeare.load_text())
    with pytest.raises(ValueError, match="Unknown data.name 'wikipedia'"):
        run_dir.run_tokenizer(trained_on("wikipedia"), tmp_path)


def test_saved_tokenizer_is_the_one_a_run_gets_back(run, tmp_path):
    from lmjax.data.shakespeare import CharTokenizer
    from lmjax.data.tokenizers.byte import ByteTokenizer

    config = trained_on("shakespeare")
    chars = CharTokenizer.from_text("to be or not")
    run_dir.save_run_tokenizer(tmp_path, chars)
    assert run_dir.run_tokenizer(config, tmp_path) == chars  # not the package text's 76 characters
    run_dir.save_run_tokenizer(tmp_path, ByteTokenizer())
    assert isinstance(run_dir.run_tokenizer(config, tmp_path), ByteTokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]

    run_dir.save_run_tokenizer(tmp_path / "mqar", None)  # plain ids: nothing to save
    assert not (tmp_path / "mqar").exists()
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "byte", "special_tokens": {"eod": 256}}))
    with pytest.raises(ValueError, match="numbers differently"):
        run_dir.run_tokenizer(config, tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "wordpiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer type 'wordpiece'"):
        run_dir.run_tokenizer(config, tmp_path)


# -- facts data -----------------------------------------------------------------------------------

def test_facts_data_dir_is_where_training_put_the_data(run, tmp_path):
    config = run_dir.read_run_config(run)
    folder = run_dir.facts_data_dir(config, run)
    assert (folder / "meta.json").is_file() and folder.parent == run / "data"
    assert run_dir.facts_recall_sets(config, run) == {"qa": str(folder / "qa.jsonl")}
    assert all(Path(path).is_file() for path in run_dir.facts_recall_sets(config, run).values())
    assert run_dir.require_facts_data(config, run) == folder
    task = run_dir.run_task(config, run)
    assert task.name == "facts" and task.info == {"data_dir": str(folder), "recall_sets": {"qa": str(folder / "qa.jsonl")}}

    tool = tiny_facts_config(**RUN, **{"data.mode": "tool"})
    assert run_dir.facts_data_dir(tool, run) == folder
    assert sorted(run_dir.facts_recall_sets(tool, run).values()) == [str(folder / "qatool.jsonl"), str(folder / "qatool_unseen.jsonl")]
    config = tiny_facts_config(**RUN, **{"data.cache_dir": str(tmp_path / "cache")})
    assert run_dir.facts_data_dir(config, run) == tmp_path / "cache" / folder.name
    with pytest.raises(FileNotFoundError, match="regenerate it with: python -m lmjax.data.facts --out"):
        run_dir.require_facts_data(config, run)
    assert not (tmp_path / "cache").exists()  # nothing generated


def test_a_run_without_its_data_folder_still_generates_and_exports(run, tmp_path, capsys):
    from lmjax.data import facts
    from lmjax.eval.recall import main as recall_main
    from lmjax.generate.__main__ import main as generate_main
    from lmjax.generate.api import Generator
    from lmjax.interop.consolidated import export_run, load_consolidated

    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    shutil.rmtree(workdir / "data")

    generator = Generator.from_workdir(workdir, lanes=1)
    [completion] = generator.generate(["When was Ada born?"], max_new_tokens=4)
    assert len(completion.tokens) == 4
    _, params = load_consolidated(export_run(workdir, tmp_path / "export"))
    assert_bit_identical(params, full_restore(run).params)
    assert not (workdir / "data").exists()  # nothing regenerated

    # What needs the data says how to regenerate it, in one line.
    assert generate_main(["--workdir", str(workdir), "--prompt", "hi", "--tools", "facts"]) == 2
    assert recall_main(["--workdir", str(workdir), "--limit", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": error: ")[0] for line in lines] == ["lmjax.generate", "lmjax.eval.recall"]
    command = lines[-1].split("regenerate it with: python -m lmjax.data.facts ")[1]
    assert facts.main(shlex.split(command)) == 0
    assert recall_main(["--workdir", str(workdir), "--limit", "1", "--lanes", "1"]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) >= {"eval/qa_recall"}


# -- no trainer after training --------------------------------------------------------------------

def test_generation_recall_and_export_never_import_the_trainer(run, tmp_path, subprocess_env):
    """Importing the entry points, then running each of them, leaves lmjax.train unimported."""
    script = f"""
import sys
import lmjax.generate, lmjax.generate.__main__, lmjax.generate.api, lmjax.generate.load
import lmjax.eval.recall, lmjax.export, lmjax.interop.consolidated, lmjax.run_dir, lmjax.cli
def trainer():
    return sorted(m for m in sys.modules if m == "lmjax.train" or m.startswith("lmjax.train."))
assert not trainer(), ("on import", trainer())
workdir = {str(run)!r}
assert lmjax.generate.__main__.main(["--workdir", workdir, "--prompt", "hi", "--max_new_tokens", "2", "--lanes", "1"]) == 0
assert lmjax.eval.recall.main(["--workdir", workdir, "--limit", "1", "--lanes", "1"]) == 0
assert lmjax.export.main(["--workdir", workdir, "--out", {str(tmp_path / "export")!r}]) == 0
assert not trainer(), ("after running", trainer())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


# -- lmjax.cli ------------------------------------------------------------------------------------

def test_cli_user_errors_are_one_line_and_status_2(capsys):
    from lmjax.cli import run as run_cli
    from lmjax.registry import ConfigError

    def parse(argv):
        return argv

    def fails(error):
        def body(args):
            raise error

        return body

    assert run_cli("lmjax.x", parse, lambda args: None, []) == 0
    assert run_cli("lmjax.x", parse, lambda args: 3, []) == 3
    for error in (ValueError("bad\nvalue"), ConfigError("bad key"), FileNotFoundError("no file")):
        assert run_cli("lmjax.x", parse, fails(error), ["--a"]) == 2
    assert capsys.readouterr().err.splitlines() == ["lmjax.x: error: bad value", "lmjax.x: error: bad key", "lmjax.x: error: no file"]
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_cli("lmjax.x", parse, fails(KeyError("bug")), [])
