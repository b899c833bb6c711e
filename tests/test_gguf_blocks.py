"""A GGUF's Q8_0 / Q4_0 / Q4_1 blocks loaded as lmjax QuantizedArrays (lmjax/interop/gguf_blocks.py),
against the `gguf` package's own dequantization (lmjax.interop.gguf.load_gguf, itself tested
bit for bit against transformers)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import write_llama_gguf
from lmjax.interop.bundled import smollm2_gguf
from lmjax.interop.gguf import load_gguf
from lmjax.interop.gguf_blocks import blocks_of, load_gguf_blocks
from lmjax.interop.hf import hf_tensors
from lmjax.interop.pretrained import load_pretrained
from lmjax.models.transformer import Transformer
from lmjax.quant.qarray import QuantizedArray
from lmjax.quant.quantize import dequantize_params, weight_bytes

is_q = lambda x: isinstance(x, QuantizedArray)  # noqa: E731


def assert_same_weights(blocks_cfg, blocks_params, float_cfg, float_params):
    """Every tensor, dequantized from the kept blocks, equals the gguf package's dequantization
    (up to f32 rounding of the Q4_1 offset m + 8 d)."""
    ours = hf_tensors(blocks_cfg, dequantize_params(blocks_params))
    theirs = hf_tensors(float_cfg, float_params)
    assert set(ours) == set(theirs)
    for name, array in theirs.items():
        np.testing.assert_allclose(ours[name], array, rtol=0, atol=2e-6 * np.abs(array).max(), err_msg=name)


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    return load_gguf_blocks(path, scan_layers=False), load_gguf(path, scan_layers=False)


@pytest.mark.slow  # SmolLM2 loaded twice (~30 s): in the slow run, which CI runs too
def test_smollm2_blocks_are_the_files_codes(smollm2):
    (cfg, params), (float_cfg, float_params) = smollm2
    assert cfg == float_cfg
    leaves = jax.tree.leaves(params, is_leaf=is_q)
    quantized = [x for x in leaves if is_q(x)]
    # SmolLM2-135M-Instruct.Q4_1: 7 projections a layer in Q4_1, the embedding in Q8_0, norms in f32
    assert len(quantized) == 7 * cfg.n_layers + 1
    embedding = params["embed"]["embedding"]
    assert embedding.q.dtype == jnp.int8 and embedding.offset is None and embedding.scale.shape == (49152, 576 // 32)
    wq = params["layer_0"]["attention"]["wq"]["kernel"]
    assert wq.q.dtype == jnp.int4 and wq.offset is not None and wq.scale.shape == (576 // 32, 9, 64)
    assert all(not is_q(x) and x.ndim == 1 for x in leaves if not is_q(x))
    assert_same_weights(cfg, params, float_cfg, float_params)
    # int4 codes (int8 for the embedding) plus an f32 scale and offset a group of 32: ~6 bits a weight
    assert weight_bytes(params) < 0.21 * weight_bytes(float_params)


@pytest.mark.slow  # in the slow run, which CI runs too
def test_smollm2_blocks_model_gives_the_float_models_logits(smollm2):
    (cfg, params), (_, float_params) = smollm2
    model = Transformer(cfg)
    tokens = jnp.asarray([[1, 504, 3575, 282, 4649, 314, 216, 2]], jnp.int32)
    apply = jax.jit(lambda p: model.apply({"params": p}, tokens))
    ours, theirs = np.asarray(apply(params)), np.asarray(apply(float_params))
    np.testing.assert_allclose(ours, theirs, atol=2e-3 * np.abs(theirs).max())
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.slow  # SmolLM2 and its tokenizer loaded (~18 s): in the slow run, which CI runs too
def test_load_pretrained_keeps_blocks_only_for_gguf(tmp_path):
    pretrained = load_pretrained(smollm2_gguf(), gguf_blocks=True, scan_layers=False)
    assert is_q(pretrained.params["layer_3"]["mlp"]["w_down"]["kernel"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_pretrained(tmp_path, gguf_blocks=True)


# -- tiny files: each block type, scanned and unrolled layouts ------------------------------------


def write_quantized_gguf(path, kinds):
    """A 2-layer llama GGUF (d=64, 2 heads of 32, MLP 96, vocab 40) whose 2-D tensors are
    stored as `kinds[i % len(kinds)]` (names of gguf.GGMLQuantizationType) in turn."""
    import gguf

    V, E, L, H, K, F = 40, 64, 2, 2, 1, 96
    D = E // H
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.normal(size=(V, E)), "output_norm.weight": 1 + 0.1 * rng.normal(size=E)}
    for i in range(L):
        for name, shape in [("attn_q", (H * D, E)), ("attn_k", (K * D, E)), ("attn_v", (K * D, E)),
                            ("attn_output", (E, H * D)), ("ffn_gate", (F, E)), ("ffn_up", (F, E)), ("ffn_down", (E, F)),
                            ("attn_norm", (E,)), ("ffn_norm", (E,))]:
            tensors[f"blk.{i}.{name}.weight"] = rng.normal(size=shape) / (shape[-1] ** 0.5 if len(shape) == 2 else 1)
    kinds_in_turn = iter(kinds * len(tensors))

    def stored(name, w):
        if w.ndim == 1:
            return None
        kind = gguf.GGMLQuantizationType[next(kinds_in_turn)]
        return gguf.quants.quantize(w, kind), kind

    tensors = {name: w.astype(np.float32) for name, w in tensors.items()}
    write_llama_gguf(path, tensors, layers=L, dim=E, ffn=F, heads=H, kv_heads=K, vocab=V, rope_base=10000.0, stored=stored)


@pytest.mark.parametrize("kinds", [["Q8_0"], ["Q4_0"], ["Q4_1"], ["Q4_1", "Q8_0", "F32", "Q4_0"]],
                         ids=["q8_0", "q4_0", "q4_1", "mixed"])
def test_tiny_gguf_blocks_equal_the_gguf_packages_dequantization(tmp_path, kinds):
    write_quantized_gguf(tmp_path / "m.gguf", kinds)
    for scan in (False, True):
        cfg, params = load_gguf_blocks(tmp_path / "m.gguf", scan_layers=scan)
        float_cfg, float_params = load_gguf(tmp_path / "m.gguf", scan_layers=scan)
        assert_same_weights(cfg, params, float_cfg, float_params)
        leaves = jax.tree.leaves(params, is_leaf=is_q)
        if kinds != ["Q4_1", "Q8_0", "F32", "Q4_0"] or not scan:  # scanned mixed layers share a float layout
            assert any(is_q(x) for x in leaves)
        tokens = jnp.arange(12, dtype=jnp.int32)[None] % cfg.vocab_size
        ours = Transformer(cfg).apply({"params": params}, tokens)
        theirs = Transformer(float_cfg).apply({"params": float_params}, tokens)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-4)


def test_block_codes_decode_as_the_gguf_package_does():
    """blocks_of against gguf.quants.dequantize on one tensor of each type, from raw bytes."""
    import gguf

    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 96)).astype(np.float32)
    for name in ("Q8_0", "Q4_0", "Q4_1"):
        kind = gguf.GGMLQuantizationType[name]
        raw = gguf.quants.quantize(w, kind)

        class Tensor:  # what blocks_of reads of a gguf.ReaderTensor
            tensor_type, shape, data = kind, np.array([96, 8]), raw

        codes, scale, offset = blocks_of(Tensor)
        got = codes.reshape(8, 3, 32) * scale[..., None] + (0 if offset is None else offset[..., None])
        np.testing.assert_allclose(got.reshape(8, 96), gguf.quants.dequantize(raw, kind), atol=1e-6, err_msg=name)
        assert codes.min() >= (-128 if name == "Q8_0" else -8) and codes.max() <= (127 if name == "Q8_0" else 7)
