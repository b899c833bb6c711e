"""Hugging Face Llama folders <-> lmjax (lmjax/interop/hf.py), against transformers itself.

torch and transformers are part of the `test` extra: imported normally, so a missing install
fails loudly instead of skipping.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import unit_scale_weights
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lmjax.interop.hf import load_hf_folder, save_hf_folder
from lmjax.interop.pretrained import is_pretrained_path, read_shape
from lmjax.models.transformer import Transformer

V, E, N_LAYERS, H, F = 300, 64, 3, 4, 128
ROPE_BASE = 5000.0  # not the default, so a rope_theta read from the wrong key shows


def hf_llama(kv_heads, tied, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V, hidden_size=E, intermediate_size=F, num_hidden_layers=N_LAYERS,
        num_attention_heads=H, num_key_value_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=ROPE_BASE,
        tie_word_embeddings=tied, attn_implementation="eager", max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    unit_scale_weights(model)
    return model


def inputs():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, size=(2, 16))
    # Row 1 starts at position 37, as a continuation would: RoPE is compared away from the origin.
    positions = np.stack([np.arange(16), 37 + np.arange(16)])
    return tokens, positions


def hf_logits(model):
    tokens, positions = inputs()
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), position_ids=torch.tensor(positions)).logits.numpy()


def lmjax_logits(cfg, params):
    tokens, positions = inputs()
    apply = jax.jit(lambda p, t, pos: Transformer(cfg).apply({"params": p}, t, pos))
    return np.asarray(apply(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32)))


def assert_logits_close(got, want):
    assert got.shape == want.shape
    assert np.abs(want).max() > 1.0  # logits are O(1), so the bound below is meaningful
    # Both f32, the same math in a different op order (fused einsums vs torch matmuls): ~1e-6 per
    # op, ~1e-5 after three blocks; 1e-4 leaves margin, while a misplaced head, transpose or RoPE
    # pairing is an O(1) error.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# (kv heads, tied): one kv head (multi-query), grouped, and as many as query heads (plain MHA).
CASES = [(1, True), (2, False), (4, True), (4, False)]
SLOW_CASES = [(1, True), (2, False), (4, True)]  # ~20-35 s each on two cores: in the slow run


@pytest.mark.parametrize("kv_heads,tied", [
    pytest.param(k, t, id=f"kv{k}-{'tied' if t else 'untied'}", marks=pytest.mark.slow if (k, t) in SLOW_CASES else ())
    for k, t in CASES
])
def test_import_gives_transformers_logits(tmp_path, kv_heads, tied):
    hf = hf_llama(kv_heads, tied)
    hf.save_pretrained(tmp_path)
    assert is_pretrained_path(tmp_path)
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) is not tied
    want = hf_logits(hf)
    for scan in (True, False):
        cfg, params = load_hf_folder(tmp_path, scan_layers=scan)
        assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.rope_base, cfg.norm_eps, cfg.scan_layers) == (kv_heads, tied, ROPE_BASE, 1e-5, scan)
        # The importer fills exactly the tree lmjax creates, shape for shape.
        init = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, nn.meta.unbox(init))
        assert_logits_close(lmjax_logits(cfg, params), want)
    assert read_shape(tmp_path)["n_kv_heads"] == kv_heads


def test_sharded_folder_imports_like_one_file(tmp_path):
    hf = hf_llama(2, False)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    _, one = load_hf_folder(tmp_path / "one")
    cfg, sharded = load_hf_folder(tmp_path / "sharded")
    jax.tree.map(np.testing.assert_array_equal, sharded, one)
    assert_logits_close(lmjax_logits(cfg, sharded), hf_logits(hf))


def test_bfloat16_checkpoint_and_params(tmp_path):
    hf = hf_llama(2, True)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    cfg, params = load_hf_folder(tmp_path, param_dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    want = hf.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"], np.float32), want)


@pytest.mark.parametrize("kv_heads,tied", [(1, True), (2, False)], ids=["kv1-tied", "kv2-untied"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, kv_heads, tied):
    hf = hf_llama(kv_heads, tied)
    hf.save_pretrained(tmp_path / "in")
    cfg, params = load_hf_folder(tmp_path / "in", scan_layers=not tied)  # both layouts export
    save_hf_folder(tmp_path / "out", cfg, params)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is tied

    back = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager").eval()
    assert back.config.rope_parameters["rope_theta"] == ROPE_BASE and back.config.num_key_value_heads == kv_heads
    for (name, a), b in zip(hf.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name  # f32 in, f32 out: bit for bit
    np.testing.assert_array_equal(hf_logits(back), hf_logits(hf))
    # And lmjax reads its own export back unchanged.
    cfg2, params2 = load_hf_folder(tmp_path / "out", scan_layers=not tied)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_export_refuses_to_overwrite_unless_asked(tmp_path):
    hf = hf_llama(1, True)
    hf.save_pretrained(tmp_path / "in")
    cfg, params = load_hf_folder(tmp_path / "in")
    save_hf_folder(tmp_path / "out", cfg, params)
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        save_hf_folder(tmp_path / "out", cfg, params)
    # Overwriting a sharded folder removes its index and shards, which would shadow the new file.
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    save_hf_folder(tmp_path / "sharded", cfg, params, overwrite=True)
    assert not list((tmp_path / "sharded").glob("model-*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


class FakeTokenizer:
    bos_id, eos_id = 5, 7

    def save_hf_files(self, out_dir):
        (out_dir / "tokenizer.json").write_text("{}")


def test_export_writes_the_tokenizer_files_and_its_ids(tmp_path):
    hf = hf_llama(1, True)
    hf.save_pretrained(tmp_path / "in")
    cfg, params = load_hf_folder(tmp_path / "in")
    save_hf_folder(tmp_path / "out", cfg, params, FakeTokenizer())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (5, 7)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling .* is not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters .* is not supported"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
        ({"head_dim": 32}, "head_dim 32 .* is not supported"),
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type 'mistral' .* is not supported"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "architectures .* is not supported"),
        ({"tie_word_embeddings": False}, "has no tensor lm_head.weight"),
        ({"vocab_size": 200}, "model.embed_tokens.weight .* is \\[300, 64\\], but the config asks for \\[200, 64\\]"),
    ],
    ids=["rope_scaling", "rope_type", "attention_bias", "mlp_bias", "head_dim", "mistral", "classifier", "no_lm_head", "shape"],
)
def test_unsupported_folders_are_one_line_errors(tmp_path, changes, message):
    hf_llama(1, True).save_pretrained(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as error:
        load_hf_folder(tmp_path)
    assert "\n" not in str(error.value)


def test_unexpected_tensors_and_missing_weights_are_errors(tmp_path):
    from safetensors.numpy import save_file

    hf_llama(1, True).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(E, np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no place for: model.layers.0.self_attn.q_proj.bias"):
        load_hf_folder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors or model.safetensors.index.json"):
        load_hf_folder(tmp_path)
    assert not is_pretrained_path(tmp_path)
