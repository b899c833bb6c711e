"""lmjax.kernels.flash_attention against the xla reference (lmjax.models.attention.xla_attention
with the dense mask of lmjax.models.masks), outputs and gradients, in Pallas interpret mode.

Interpret mode runs the kernels as plain XLA loops on the CPU: slow, so shapes are tiny and each
case compiles forward + backward once. Tolerances: f32 agrees to ~1e-6 (same math, different
summation order), so 2e-5 leaves room. bf16 rounds the probabilities before the p @ v product
(as xla_attention does) and the kernels also round ds before the dq / dk matmuls and the
outputs to bf16 (8 bits of mantissa, ~4e-3 relative); measured errors are ~5e-3 of the largest
entry (experiments/bench_kernels.py prints them), so bf16 is compared at 2e-2 of that scale.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.kernels.flash_attention import flash_attention
from lmjax.models.attention import AttentionMask, cudnn_attention, pallas_attention, xla_attention
from lmjax.models.kv_cache import KVCache
from lmjax.models.transformer import Transformer, TransformerConfig


def packed_inputs(seed, B, L, H, K, D, dtype, kind):
    """q, k, v and an AttentionMask: kind "causal" (one sequence a row), "packed" (segments and
    trailing padding), "prefix" (packed, with a prompt at the start of each segment)."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(B, L, h, D)), dtype) for h in (H, K, K))
    segment_ids = np.ones((B, L), np.int32)
    prompt = None
    if kind in ("packed", "prefix"):
        for b in range(B):
            cuts = np.sort(rng.choice(np.arange(2, L - 2), size=2, replace=False))
            segment_ids[b, cuts[0]:] = 2
            segment_ids[b, cuts[1]:] = 3
            segment_ids[b, L - 1 - b * 3:] = 0  # padding at the end, a different amount per row
    if kind == "prefix":
        starts = [np.flatnonzero(np.diff(row, prepend=-1)) for row in segment_ids]
        prompt = np.zeros((B, L), bool)
        for b, row_starts in enumerate(starts):
            for s in row_starts:
                prompt[b, s : s + 3] = segment_ids[b, s] != 0
        prompt = jnp.asarray(prompt)
    return q, k, v, AttentionMask.packed(jnp.asarray(segment_ids), prompt)


def loss_and_out(attend):
    def loss(q, k, v):
        out = attend(q, k, v)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return jnp.sum(out.astype(jnp.float32) * w), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def assert_close(got, want, rel):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * scale)


CASES = [
    # B, L, H, K, D, dtype, mask, block_q, block_k, tolerance
    (2, 37, 4, 2, 16, jnp.float32, "causal", 16, 8, 2e-5),  # L not a multiple of either block
    pytest.param(2, 32, 2, 2, 8, jnp.float32, "packed", 8, 16, 2e-5, marks=pytest.mark.slow),  # H == K (slow run: ~4 s)
    pytest.param(1, 29, 4, 2, 16, jnp.float32, "prefix", 16, 16, 2e-5, marks=pytest.mark.slow),  # (slow run; prefix: bf16 below)
    (2, 24, 4, 2, 16, jnp.bfloat16, "prefix", 8, 8, 2e-2),
    (1, 20, 4, 1, 8, jnp.float32, "packed", 128, 128, 2e-5),  # default blocks, shrunk to L
]


@pytest.mark.parametrize("B,L,H,K,D,dtype,kind,block_q,block_k,tol", CASES)
def test_outputs_and_gradients_match_xla(B, L, H, K, D, dtype, kind, block_q, block_k, tol):
    q, k, v, mask = packed_inputs(L, B, L, H, K, D, dtype, kind)
    flash = lambda q, k, v: pallas_attention(q, k, v, mask, block_q=block_q, block_k=block_k, backend="interpret")
    # Reference in f32 on the same (possibly bf16-rounded) inputs.
    ref = lambda q, k, v: xla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
    (_, out), grads = loss_and_out(flash)(q, k, v)
    (_, want_out), want_grads = loss_and_out(ref)(q, k, v)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(out, want_out, tol)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert_close(g, w, tol)


def test_cache_mask_chunk_against_cache_slots():
    """Generation's rule (AttentionMask.cache): a chunk of queries at positions, keys = slots,
    a prompt seen both ways; S = 24 slots, chunk of 6 holding the whole prompt."""
    rng = np.random.default_rng(1)
    B, L, S, H, K, D = 2, 6, 24, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(B, L, H, D)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, S, K, D)), jnp.float32) for _ in range(2))
    positions = jnp.asarray([[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]], jnp.int32)
    prompt = jnp.asarray([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    mask = AttentionMask.cache(positions, S, prompt)
    got = pallas_attention(q, k, v, mask, block_q=8, block_k=8, backend="interpret")
    assert_close(got, xla_attention(q, k, v, mask), 2e-5)


def test_mosaic_tpu_backend_in_tpu_interpret_mode():
    """The TPU pallas_call parameters, run by the TPU interpreter on the CPU."""
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, mask = packed_inputs(3, 1, 16, 2, 1, 8, jnp.float32, "packed")
    flash = lambda q, k, v: pallas_attention(q, k, v, mask, block_q=8, block_k=8, backend="mosaic_tpu")
    with pltpu.force_tpu_interpret_mode():
        (_, out), grads = loss_and_out(flash)(q, k, v)
    (_, want_out), want_grads = loss_and_out(lambda q, k, v: xla_attention(q, k, v, mask))(q, k, v)
    for g, w in zip((out, *grads), (want_out, *want_grads)):
        assert_close(g, w, 2e-5)


def test_clear_errors():
    q, k, v, mask = packed_inputs(0, 1, 8, 3, 2, 8, jnp.float32, "causal")
    with pytest.raises(TypeError, match="AttentionMask"):
        pallas_attention(q, k, v, mask.dense_BxLxS)
    parts = (mask.q_segment_ids_BxL, mask.kv_segment_ids_BxS, mask.q_positions_BxL, mask.kv_positions_BxS,
             mask.q_prompt_BxL, mask.kv_prompt_BxS)
    with pytest.raises(ValueError, match="multiple of K"):
        flash_attention(q, k, v, *parts, backend="interpret")
    with pytest.raises(ValueError, match="choose one of"):
        flash_attention(q[:, :, :2], k, v, *parts, backend="cuda")


def test_cudnn_name_falls_back_to_xla_off_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU 'cudnn' runs cuDNN; covered by experiments/bench_kernels.py")
    q, k, v, mask = packed_inputs(4, 2, 12, 4, 2, 8, jnp.float32, "prefix")
    assert_close(jax.jit(cudnn_attention)(q, k, v, mask), xla_attention(q, k, v, mask), 2e-5)


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_transformer_pallas_matches_xla_logits_and_gradients():
    rng = np.random.default_rng(5)
    B, L, V = 2, 16, 19
    tokens = jnp.asarray(rng.integers(0, V, size=(B, L)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1] * 7 + [2] * 7 + [0] * 2], B, axis=0), jnp.int32)
    positions = jnp.asarray(np.repeat([list(range(7)) + list(range(7)) + [0, 0]], B, axis=0), jnp.int32)
    prompt = jnp.asarray(np.repeat([[1] * 3 + [0] * 4 + [1] * 2 + [0] * 7], B, axis=0), bool)
    config = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64, prefix_lm=True)
    models = {name: Transformer(TransformerConfig(**config, attention=name)) for name in ("xla", "pallas")}
    params = jax.jit(models["xla"].init)(jax.random.PRNGKey(0), tokens, positions, segment_ids, prompt)

    def loss(model):
        def f(params):
            logits = model.apply(params, tokens, positions, segment_ids, prompt)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (segment_ids != 0)), logits

        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (_, logits_xla), grads_xla = loss(models["xla"])(params)
    (_, logits_pallas), grads_pallas = loss(models["pallas"])(params)
    assert_close(logits_pallas, logits_xla, 2e-5)
    jax.tree.map(lambda a, b: assert_close(a, b, 2e-5), grads_pallas, grads_xla)


@pytest.mark.slow  # 20-50 s on two cores: in the slow run, which CI runs too
def test_transformer_pallas_with_cache_runs_xla():
    """With a KV cache the pallas implementation falls back to xla: identical logits."""
    B, L, S, V = 1, 5, 12, 11
    tokens = jnp.arange(L, dtype=jnp.int32)[None] % V
    positions = jnp.arange(L, dtype=jnp.int32)[None]
    config = dict(vocab_size=V, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=32)
    cache = KVCache(jnp.zeros((1, B, S, 1, 8)), jnp.zeros((1, B, S, 1, 8)))
    params = jax.jit(Transformer(TransformerConfig(**config)).init)(jax.random.PRNGKey(0), tokens)
    outs = [
        jax.jit(Transformer(TransformerConfig(**config, attention=name)).apply)(params, tokens, positions, cache=cache)[0]
        for name in ("xla", "pallas")
    ]
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
