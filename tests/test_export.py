"""Consolidated export (lmjax/interop/consolidated.py, python -m lmjax.export) on real tiny runs."""
import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_facts_config
from safetensors.numpy import load_file

from lmjax.interop.consolidated import export_run, load_consolidated, save_consolidated

# Two layers, so that the stacked leading dim of scanned layers is visible; checkpoints at 2 and 4;
# no evaluation (it would only add compile time).
RUN = {"model.n_layers": 2, "train.steps": 4, "checkpoint.every": 2, "train.eval_every": 1000, "train.log_every": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """scan_layers -> workdir of a trained tiny facts run."""
    from lmjax.train.loop import train

    workdirs = {}
    for scan in (False, True):
        workdirs[scan] = tmp_path_factory.mktemp(f"run_scan_{scan}")
        train(tiny_facts_config(**RUN, **{"model.scan_layers": scan}), workdirs[scan])
    return workdirs


def checkpoint_params(workdir, step=None):
    """(model, params) of the whole train state restored from the orbax checkpoint (optimizer
    included), as training left them."""
    from lmjax.run_dir import Checkpointer, read_run_config, run_model
    from lmjax.optim.optimizer import make_optimizer
    from lmjax.train.state import abstract_train_state, init_state_fn

    config = read_run_config(workdir)
    model = run_model(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, async_save=False)
    abstract = abstract_train_state(init_state_fn(model, tx, config.train.seq_len), config.seed)
    state, _ = checkpointer.restore(abstract, step, data=False)
    checkpointer.close()
    return model, state.params


def assert_bit_identical(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert (a.shape, a.dtype) == (b.shape, b.dtype), path
        assert a.tobytes() == b.tobytes(), path


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_round_trip_is_bit_identical_and_gives_the_same_logits(runs, tmp_path, scan):
    out = export_run(runs[scan], tmp_path / "export")
    model, params = load_consolidated(out)
    original_model, original = checkpoint_params(runs[scan])

    assert model.cfg == original_model.cfg and model.cfg.scan_layers is scan
    assert_bit_identical(params, original)
    init_shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"])
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init_shapes)

    tokens_BxL = jax.random.randint(jax.random.PRNGKey(0), (2, 24), 0, model.cfg.vocab_size)
    logits = jax.jit(model.apply)({"params": params}, tokens_BxL)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(jax.jit(original_model.apply)({"params": original}, tokens_BxL)))

    header = json.loads((out / "params.json").read_text())
    assert header["step"] == 4 and header["implementation"]["model"] == "transformer"
    assert header["data"] == {"name": "facts"} and header["tokenizer"]["kind"] == "bytes"
    assert header["run_config"]["model"]["scan_layers"] is scan and header["source_workdir"] == str(runs[scan].resolve())


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_safetensors_holds_full_named_arrays(runs, tmp_path, scan):
    tensors = load_file(export_run(runs[scan], tmp_path / "export") / "model.safetensors")
    assert tensors["embed.embedding"].shape == (260, 32) and tensors["lm_head.kernel"].shape == (32, 260)
    if scan:
        assert tensors["layers.attention.wq.kernel"].shape == (2, 32, 2, 16)  # [layers, embed, heads, head_dim]
        assert tensors["layers.mlp.w_up.kernel"].shape == (2, 32, 64)
    else:
        assert tensors["layer_1.attention.wq.kernel"].shape == (32, 2, 16)
        assert tensors["layer_0.mlp.w_up.kernel"].shape == (32, 64)
    assert all(t.dtype == np.float32 for t in tensors.values())


def test_bfloat16_parameters_keep_their_dtype(tmp_path):
    from lmjax.models import build_model

    config = tiny_facts_config(**{"model.param_dtype": "bfloat16", "model.scan_layers": True})
    model = build_model(config.model)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    save_consolidated(tmp_path, dataclasses.asdict(model.cfg), params, {"implementation": {"model": "transformer"}})
    loaded_model, loaded = load_consolidated(tmp_path)
    assert loaded_model.cfg == model.cfg
    assert_bit_identical(loaded, params)
    assert loaded["embed"]["embedding"].dtype == jnp.bfloat16


@pytest.mark.parametrize("edit, message", [
    (lambda h: "not json", "is not valid JSON"),
    (lambda h: {**h, "format_version": 99}, "has format_version 99; this lmjax reads version 1"),
    (lambda h: {**h, "implementation": {"model": "mamba"}}, "Unknown implementation.model 'mamba'"),
    (lambda h: {**h, "model": {**h["model"], "n_experts": 8}}, "model field(s) n_experts"),
    (lambda h: {**h, "model": {**h["model"], "dim": 64}}, "Tensor embed.embedding is float32[260, 32]"),
])
def test_load_rejects_a_bad_params_json(runs, tmp_path, edit, message):
    out = export_run(runs[False], tmp_path / "export")
    edited = edit(json.loads((out / "params.json").read_text()))
    (out / "params.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        load_consolidated(out)


def export_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "lmjax.export", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_writes_both_files(runs, tmp_path, subprocess_env):
    out = export_cli("--workdir", str(runs[False]), "--out", str(tmp_path / "export"), "--step", "2", env=subprocess_env)
    assert out.returncode == 0, out.stderr
    assert "step 2" in out.stdout and "model.safetensors" in out.stdout
    assert json.loads((tmp_path / "export" / "params.json").read_text())["step"] == 2
    _, params = load_consolidated(tmp_path / "export")
    assert_bit_identical(params, checkpoint_params(runs[False], step=2)[1])


def test_overwrite_only_when_asked(runs, tmp_path):
    export_run(runs[False], tmp_path, step=2)
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        export_run(runs[False], tmp_path)
    export_run(runs[False], tmp_path, overwrite=True)
    assert json.loads((tmp_path / "params.json").read_text())["step"] == 4


@pytest.mark.parametrize("case, message", [
    ("unknown step", "No checkpoint at step 3 in"),
    ("export already there", "already exists; pass --overwrite to replace it"),
    ("not a run", "has no config.json"),
])
def test_cli_errors_are_one_line(runs, tmp_path, subprocess_env, case, message):
    workdir, out, step = runs[False], tmp_path / "export", []
    if case == "unknown step":
        step = ["--step", "3"]
    elif case == "export already there":
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"")
    else:
        workdir = tmp_path
    result = export_cli("--workdir", str(workdir), "--out", str(out), *step, env=subprocess_env)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("lmjax.export: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if case == "unknown step":
        assert "saved steps: 2, 4." in result.stderr


# -- --format hf: a Hugging Face Llama folder -------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_hf_format_loads_in_transformers_with_lmjax_logits(runs, tmp_path, scan, capsys):
    import torch
    from transformers import LlamaForCausalLM

    from lmjax.export import main

    assert main(["--workdir", str(runs[scan]), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "as a Hugging Face Llama folder (config.json, model.safetensors" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == 96 and config["num_key_value_heads"] == 1  # train.seq_len, GQA

    model, params = checkpoint_params(runs[scan])
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    tokens_BxL = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (2, 24), 0, model.cfg.vocab_size))
    want = np.asarray(jax.jit(model.apply)({"params": params}, tokens_BxL))
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(tokens_BxL)).logits.numpy()
    # f32 both sides, the same weights: only the order of operations differs (~1e-6 relative per
    # op over two blocks); any wrong transpose or head split moves logits by their own scale
    # (~0.5 after four training steps), so the bound is relative to it.
    scale = np.abs(want).max()
    assert scale > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_hf_format_refuses_other_model_families(tmp_path):
    from lmjax.config import to_json
    from lmjax.interop.hf import export_run_hf

    (tmp_path / "config.json").write_text(to_json(tiny_facts_config(**{"implementation.model": "mamba"})))
    with pytest.raises(ValueError, match="is a mamba run; the Hugging Face export writes transformers only"):
        export_run_hf(tmp_path, tmp_path / "hf")
