import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.models.layers import Embedding, Projection, RMSNorm, apply_rope, init_for, rope_angles


def naive_rope(x_BxLxHxD, positions_BxL, base):
    """Pair component i with i + D/2 as one complex number and multiply by e^{i * pos * theta_i},
    theta_i = base^(-2i/D); float64 throughout."""
    x = np.asarray(x_BxLxHxD, np.float64)
    D = x.shape[-1]
    half = D // 2
    theta = base ** (-2.0 * np.arange(half) / D)
    z = x[..., :half] + 1j * x[..., half:]
    angle = np.asarray(positions_BxL, np.float64)[:, :, None, None] * theta
    rotated = z * np.exp(1j * angle)
    return np.concatenate([rotated.real, rotated.imag], axis=-1)


def lmjax_rope(x, positions, base):
    cos, sin = rope_angles(jnp.asarray(positions), x.shape[-1], base)
    return np.asarray(apply_rope(jnp.asarray(x), cos, sin))


def test_rope_angles_shapes():
    cos, sin = rope_angles(jnp.zeros((2, 5), jnp.int32), 16, 10000.0)
    assert cos.shape == sin.shape == (2, 5, 8) and cos.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(cos), 1.0)
    np.testing.assert_array_equal(np.asarray(sin), 0.0)


@pytest.mark.parametrize("base", [10000.0, 1e5])
def test_rope_matches_complex_rotation(base):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 3, 16)).astype(np.float32)
    positions = rng.integers(0, 200, size=(2, 6))
    # Angles up to 200 rad computed in f32 are off by ~200 * 2^-24 ~ 1e-5 rad, so rotated values
    # of O(1) inputs move by ~1e-5; 1e-4 covers that while a wrong pairing is an O(1) error.
    np.testing.assert_allclose(lmjax_rope(x, positions, base), naive_rope(x, positions, base), atol=1e-4, rtol=0)


def test_rope_matches_explicit_2x2_rotations():
    rng = np.random.default_rng(1)
    D = 8
    x = rng.normal(size=(1, 4, 2, D)).astype(np.float32)
    positions = np.array([[0, 1, 7, 31]])
    want = np.zeros(x.shape)
    for l in range(4):
        for h in range(2):
            for i in range(D // 2):
                a = positions[0, l] * 10000.0 ** (-2 * i / D)
                rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
                want[0, l, h, [i, i + D // 2]] = rot @ x[0, l, h, [i, i + D // 2]]
    # Angles below 32 rad: f32 rounding ~1e-6; 1e-5 is a safe bound.
    np.testing.assert_allclose(lmjax_rope(x, positions, 10000.0), want, atol=1e-5, rtol=0)


def test_rope_preserves_norm_and_dtype():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 2, 32)).astype(np.float32)
    out = lmjax_rope(x, rng.integers(0, 1000, size=(2, 5)), 10000.0)
    # A rotation: norms equal up to f32 rounding of cos/sin (~1e-7 relative per term).
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    cos, sin = rope_angles(jnp.zeros((2, 5), jnp.int32), 32, 10000.0)
    assert apply_rope(jnp.asarray(x, jnp.bfloat16), cos, sin).dtype == jnp.bfloat16


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(3)
    D = 16
    q = rng.normal(size=(1, 1, 1, D)).astype(np.float32)
    k = rng.normal(size=(1, 1, 1, D)).astype(np.float32)

    def score(m, n):
        return float(np.sum(lmjax_rope(q, [[m]], 10000.0) * lmjax_rope(k, [[n]], 10000.0)))

    # Same offset at different absolute positions: equal up to f32 angle rounding (positions up
    # to ~550 give angle errors ~3e-5 rad, scores of size ~D move by ~5e-4 at worst).
    for offset in (0, 1, 5, 37):
        base_score = score(10 + offset, 10)
        for shift in (0, 3, 100, 500):
            assert score(10 + offset + shift, 10 + shift) == pytest.approx(base_score, abs=1e-3)
    # ... and it does change with the offset, so the check above is not vacuous.
    assert abs(score(11, 10) - score(15, 10)) > 1e-2


def test_rmsnorm_matches_numpy():
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(2, 3, 24)) * 3 + 1).astype(np.float32)
    scale = rng.normal(size=(24,)).astype(np.float32)
    norm = RMSNorm(eps=1e-5)
    params = nn.meta.unbox(norm.init(jax.random.key(0), x)["params"])
    np.testing.assert_array_equal(np.asarray(params["scale"]), 1.0)
    out = np.asarray(norm.apply({"params": {"scale": scale}}, x))
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-5) * scale
    # f32 mean-of-squares over 24 elements and an rsqrt: relative error ~1e-6.
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)

    out_bf16 = RMSNorm(eps=1e-5, dtype=jnp.bfloat16).apply({"params": {"scale": scale}}, x)
    assert out_bf16.dtype == jnp.bfloat16
    # Normalised in f32, then rounded once to bf16 (relative step 2^-8).
    np.testing.assert_allclose(np.asarray(out_bf16, np.float32), want, rtol=1e-2, atol=1e-2)


def test_projection_matches_tensordot_and_carries_axis_names():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    proj = Projection((4, 5), (6,), ("heads", "kv", "embed"), init_for("normal", 20, 2, "out"))
    variables = proj.init(jax.random.key(0), x)
    assert nn.get_partition_spec(variables)["params"]["kernel"] == jax.sharding.PartitionSpec("heads", "kv", "embed")
    kernel = np.asarray(nn.meta.unbox(variables["params"])["kernel"])
    assert kernel.shape == (4, 5, 6)
    want = np.tensordot(x.astype(np.float64), kernel.astype(np.float64), axes=([2, 3], [0, 1]))
    # 20-term f32 dot products of O(1) x O(0.01) values.
    np.testing.assert_allclose(np.asarray(proj.apply(variables, x)), want, rtol=1e-5, atol=1e-6)


def test_embedding_lookup_and_tied_head():
    # Standalone init matters: a module field named `init` once shadowed nn.Module.init here.
    embed = Embedding(11, 6, init_for("fan_in", 6, 2, "embed"))
    tokens = np.array([[0, 3, 10], [5, 5, 1]])
    variables = embed.init(jax.random.key(0), tokens)
    assert nn.get_partition_spec(variables)["params"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    table = np.asarray(nn.meta.unbox(variables["params"])["embedding"])
    np.testing.assert_array_equal(np.asarray(embed.apply(variables, tokens)), table[tokens])
    x = np.random.default_rng(6).normal(size=(2, 3, 6)).astype(np.float32)
    logits = np.asarray(embed.apply(variables, x, method=Embedding.attend))
    # 6-term f32 dot products of O(1) values.
    np.testing.assert_allclose(logits, x.astype(np.float64) @ table.T.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_unknown_init_scheme_says_what_to_choose():
    with pytest.raises(ValueError, match="choose one of: fan_in, normal"):
        init_for("xavier", 64, 2, "in")
