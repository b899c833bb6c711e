"""lmjax.quant: quantize/dequantize against a naive numpy reference, quantized models against
their float twins, GPTQ against round-to-nearest, and a quantized forward on a mesh."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.quant import QuantizedArray
from lmjax.quant.quantize import QuantSpec, dequantize_params, quantize_params, rtn_quantize, weight_bytes

ROOT = Path(__file__).resolve().parents[1]
CFG = TransformerConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=128)


def tiny(cfg=CFG, seed=0):
    model = Transformer(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    return model, params


def apply(model, variables, tokens):
    return jax.jit(model.apply)(variables, tokens)


def naive_int8_per_channel(w_IxO):
    scale = np.abs(w_IxO).max(axis=0) / 127
    return np.clip(np.round(w_IxO / scale), -127, 127) * scale


def naive_int4_groups(w_IxO, g):
    out = np.empty_like(w_IxO)
    for start in range(0, w_IxO.shape[0], g):
        block = w_IxO[start:start + g]
        lo, hi = block.min(axis=0), block.max(axis=0)
        scale = (hi - lo) / 15
        out[start:start + g] = np.clip(np.round((block - lo) / scale), 0, 15) * scale + lo
    return out


def test_int8_per_channel_round_trip_matches_naive_numpy():
    w = np.random.default_rng(0).normal(size=(48, 24)).astype(np.float32)
    qa = rtn_quantize(w, 1, 1, QuantSpec(bits=8))
    assert qa.q.dtype == jnp.int8 and qa.scale.shape == (1, 24)
    # float32 rounding of w / scale can differ from numpy's float64 at exact .5 ties: one step at most
    np.testing.assert_allclose(qa.dequantize(), naive_int8_per_channel(w.astype(np.float64)), atol=1e-6)


def test_int4_groups_round_trip_matches_naive_numpy_on_an_nd_kernel():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 4, 16, 8)).astype(np.float32)  # [layers, heads, kv (in), embed (out)]
    qa = rtn_quantize(w, 2, 1, QuantSpec(bits=4, group_size=8))
    assert qa.q.dtype == jnp.int4 and qa.scale.shape == (3, 4, 2, 8)
    want = np.stack([naive_int4_groups(w[p].reshape(64, 8).astype(np.float64), 8).reshape(4, 16, 8) for p in range(3)])
    np.testing.assert_allclose(qa.dequantize(), want, atol=1e-5)
    assert qa.nbytes == w.size // 2 + 2 * qa.scale.size * 4  # packed codes + scales + offsets


def test_bad_group_size_says_which_divisor_to_pick():
    with pytest.raises(ValueError, match="pick a divisor of 16"):
        rtn_quantize(np.zeros((4, 16, 8), np.float32), 2, 1, QuantSpec(bits=4, group_size=32))
    with pytest.raises(ValueError, match="int8 or int4"):
        QuantSpec.parse("int3")


def test_int8_logits_close_to_float_and_every_matmul_weight_quantized():
    model, params = tiny()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, 64)
    ref = apply(model, {"params": params}, tokens)
    qparams = quantize_params(model, params, "int8")
    n_quantized = sum(isinstance(x, QuantizedArray) for x in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, QuantizedArray)))
    assert n_quantized == 7 + 2  # 7 stacked kernels per layer + lm_head + embedding
    out = apply(model, {"params": qparams}, tokens)
    # int8 steps are 1/254 of a channel's range; nine quantized matmuls in a row move the logits
    # by about 1% of their spread (RMS), a few % at the worst of 4k logits
    spread = float(jnp.std(ref))
    assert float(jnp.sqrt(jnp.mean((out - ref) ** 2))) < 0.02 * spread
    assert float(jnp.max(jnp.abs(out - ref))) < 0.06 * spread
    assert weight_bytes(qparams) < 0.3 * weight_bytes(params)


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_tied_embedding_quantized_per_vocabulary_row():
    model, params = tiny(TransformerConfig(**{**CFG.__dict__, "tie_embeddings": True}))
    qparams = quantize_params(model, params, "int4-g16")
    emb = qparams["embed"]["embedding"]
    assert emb.scale.shape == (64, 4)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 64)
    np.testing.assert_allclose(apply(model, {"params": qparams}, tokens),
                               apply(model, {"params": dequantize_params(qparams)}, tokens), atol=1e-4)


@pytest.mark.parametrize("spec", [pytest.param("int8", marks=pytest.mark.slow), pytest.param("int4-g16", marks=pytest.mark.slow)])  # 30 s each
def test_jitted_decoder_with_quantized_params_gives_the_tokens_of_the_dequantized_float_params(spec):
    from lmjax.generate.decoder import Decoder, LaneRequests

    model, params = tiny()
    qparams = quantize_params(model, params, spec)
    fparams = dequantize_params(qparams)
    prompts = np.random.default_rng(0).integers(0, 64, size=(2, 6)).tolist()

    def greedy(p):
        decoder = Decoder(model, 2, 32, chunk=8)
        requests = LaneRequests.empty(2).replace(max_new=np.full(2, 16, np.int32))
        state, first = decoder.prefill(p, decoder.init_state(), prompts, np.zeros(2, np.int32), requests, reset=[True] * 2)
        out = [[int(t)] for t in first]
        while np.asarray(state.active).any():
            state, tokens, counts = decoder.decode(p, state, requests)
            for b in range(2):
                out[b] += tokens[b, : counts[b]].tolist()
        return out, decoder

    assert greedy(qparams)[0] == greedy(fparams)[0]


@pytest.mark.slow
def test_generator_quantize_option():
    from lmjax.data.tokenizers.byte import ByteTokenizer
    from lmjax.generate.api import Generator

    model, params = tiny(TransformerConfig(**{**CFG.__dict__, "vocab_size": 260}))
    tok = ByteTokenizer()
    g = Generator(model, params, tok, lanes=2, max_len=32, chunk=8, quantize="int8")
    ref = Generator(model, dequantize_params(quantize_params(model, params, "int8")), tok, lanes=2, max_len=32, chunk=8)
    a = g.generate(["ab", "cd"], chat=False, max_new_tokens=8)
    b = ref.generate(["ab", "cd"], chat=False, max_new_tokens=8)
    assert [c.tokens for c in a] == [c.tokens for c in b]


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_gptq_lowers_output_error_against_round_to_nearest():
    model, params = tiny()
    rng = np.random.default_rng(0)
    calibration = [rng.integers(0, 64, size=(8, 64))]
    held_out = jnp.asarray(rng.integers(0, 64, size=(4, 64)))
    ref = apply(model, {"params": params}, held_out)

    def error(spec):
        out = apply(model, {"params": quantize_params(model, params, spec, calibration=calibration)}, held_out)
        return float(jnp.sqrt(jnp.mean((out - ref) ** 2)))

    for rtn, gptq in [("int4-g16", "int4-g16-gptq"), ("int8", "int8-gptq")]:
        assert error(gptq) < 0.95 * error(rtn), (rtn, error(rtn), error(gptq))


SHARDED = textwrap.dedent("""
    import json, sys
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    from lmjax.models.transformer import Transformer, TransformerConfig
    from lmjax.parallel.layout import Layout
    from lmjax.quant.quantize import param_shardings, put_params, quantize_params
    cfg = TransformerConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=128)
    model = Transformer(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    tokens = np.random.default_rng(0).integers(0, 64, size=(4, 16))
    out = {}
    for spec in ["int8", "int4-g8"]:
        qparams = quantize_params(model, params, spec)
        single = np.asarray(jax.jit(model.apply)({"params": qparams}, tokens))
        layout = Layout.from_devices(data=2, model=4)
        shardings = param_shardings(model, qparams, layout)
        sharded = put_params(qparams, shardings)
        w_down = sharded["layers"]["mlp"]["w_down"]["kernel"]
        wq = sharded["layers"]["attention"]["wq"]["kernel"]
        spec_q, spec_s = str(w_down.q.sharding.spec), str(w_down.scale.sharding.spec)
        spec_wq = str(wq.scale.sharding.spec)
        with layout.context():
            got = np.asarray(layout.jit(model.apply)({"params": sharded}, layout.put_rows(tokens)))
        out[spec] = dict(diff=float(np.abs(got - single).max()), q=spec_q, scale=spec_s, wq_scale=spec_wq,
                         devices=len(w_down.q.sharding.device_set))
    print("RESULT", json.dumps(out))
""")


def test_sharded_quantized_forward_equals_the_unsharded_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULT", 1)[1])
    for spec, r in results.items():
        assert r["devices"] == 8
        assert "model" in r["q"], r  # w_down's contracting mlp axis on `model`
        assert r["wq_scale"] == "P(None, None, 'model', None)", r  # scales shard like the output (heads) axis
        if spec.startswith("int4"):
            assert "model" in r["scale"], r  # w_down's groups split along mlp like its codes
        assert r["diff"] < 1e-4, (spec, r)
