import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.models.attention import xla_attention

N_HEADS = 4


def random_mask(rng, B, L, S):
    """Random boolean mask where every query row keeps at least one key; some rows keep exactly
    one (like a padding row that only sees itself)."""
    mask = rng.random((B, L, S)) < 0.4
    lonely = rng.random((B, L)) < 0.2
    mask[lonely] = False
    rows_b, rows_l = np.nonzero(~mask.any(-1))
    mask[rows_b, rows_l, rng.integers(0, S, size=rows_b.size)] = True
    assert mask.any(-1).all()
    return mask


def random_qkvm(seed, n_kv, B=2, L=7, S=9, D=8):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, L, N_HEADS, D)).astype(np.float32)
    k = rng.normal(size=(B, S, n_kv, D)).astype(np.float32)
    v = rng.normal(size=(B, S, n_kv, D)).astype(np.float32)
    return q, k, v, random_mask(rng, B, L, S)


def naive_attention_np(q, k, v, mask):
    """One (batch, head) at a time in float64; query head h reads kv head h // (H / K), the
    grouping of HF's repeat_kv."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, L, H, D = q.shape
    K = k.shape[2]
    out = np.zeros((B, L, H, D))
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)
            scores = q[b, :, h] @ k[b, :, kv].T / np.sqrt(D)
            scores = np.where(mask[b], scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[b, :, h] = probs @ v[b, :, kv]
    return out


def naive_attention_jnp(q, k, v, mask):
    """The same loop in jnp, differentiable, sharing no code with lmjax."""
    B, L, H, D = q.shape
    K = k.shape[2]
    heads = []
    for h in range(H):
        kv = h // (H // K)
        scores = jnp.einsum("bld,bsd->bls", q[:, :, h], k[:, :, kv]) / np.sqrt(D)
        scores = jnp.where(mask, scores, -jnp.inf)
        probs = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
        probs = probs / probs.sum(-1, keepdims=True)
        heads.append(jnp.einsum("bls,bsd->bld", probs, v[:, :, kv]))
    return jnp.stack(heads, axis=2)


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_matches_naive_per_head_softmax(n_kv):
    q, k, v, mask = random_qkvm(seed=n_kv, n_kv=n_kv)
    out = np.asarray(xla_attention(q, k, v, mask))
    assert out.shape == q.shape and out.dtype == np.float32
    # f32 einsums against a float64 loop on O(1) inputs with D=8: a few ulps of f32 (~1e-7)
    # times the reduction lengths; 1e-5 leaves a wide margin and still catches any wrong
    # head grouping, scale or mask (those are O(0.1) errors).
    np.testing.assert_allclose(out, naive_attention_np(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_query_length_differs_from_key_length():
    # Decode-style shapes: one query against a longer key sequence.
    q, k, v, mask = random_qkvm(seed=11, n_kv=2, L=1, S=13)
    np.testing.assert_allclose(
        np.asarray(xla_attention(q, k, v, mask)), naive_attention_np(q, k, v, mask), rtol=1e-5, atol=1e-5
    )


def test_masked_keys_have_no_influence():
    q, k, v, mask = random_qkvm(seed=5, n_kv=2)
    out = np.asarray(xla_attention(q, k, v, mask))
    # Change k and v wildly at keys no query of that batch row can see.
    hidden_BxS = ~mask.any(axis=1)
    assert hidden_BxS.any()
    k2, v2 = k.copy(), v.copy()
    k2[hidden_BxS] = 1e3
    v2[hidden_BxS] = -1e3
    np.testing.assert_array_equal(np.asarray(xla_attention(q, k2, v2, mask)), out)


def assert_same_gradients(fn, reference, q, k, v, mask, cotangent):
    """d<fn(q, k, v, mask), cotangent>/d(q, k, v) against the reference's. Both in f32 with
    different op orders; gradients are O(1), so 1e-5 absolute covers rounding while a wrong
    mask/grouping would be off by O(0.1)."""
    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v, mask) * cotangent)

    got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_gradients_match_naive_jnp(n_kv):
    q, k, v, mask = random_qkvm(seed=20 + n_kv, n_kv=n_kv)
    cotangent = np.random.default_rng(0).normal(size=q.shape).astype(np.float32)
    assert_same_gradients(xla_attention, naive_attention_jnp, q, k, v, mask, cotangent)


def test_bfloat16_inputs_stay_close():
    q, k, v, mask = random_qkvm(seed=3, n_kv=2)
    out = xla_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), mask)
    assert out.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 4e-3) on inputs, probabilities and
    # output; a few such roundings on O(1) values stay well under 5e-2.
    np.testing.assert_allclose(
        np.asarray(out, np.float32), naive_attention_np(q, k, v, mask), rtol=5e-2, atol=5e-2
    )


def packed_rows(rng, B, L, longest, padding=True):
    """Segment ids of rows packed with sequences of 1..`longest` tokens, padding (0) at the end."""
    segment_ids = np.zeros((B, L), np.int32)
    for b in range(B):
        start, segment = 0, 1
        while start < L - (8 if padding else 0):
            n = min(int(rng.integers(1, longest + 1)), L - start)
            segment_ids[b, start:start + n] = segment
            start, segment = start + n, segment + 1
    return segment_ids


@pytest.mark.parametrize("longest,prompts", [(0, False), (23, False), (23, True), (0, True), (64, False)])
def test_key_ranges_hold_every_allowed_key(longest, prompts):
    """Outside its blocks' ranges the dense mask (the reference) allows nothing; inside, each
    range is as tight as its formula says (checked by the known counts below)."""
    from lmjax.models.attention import AttentionMask, key_ranges

    rng = np.random.default_rng(longest + prompts)
    L = 100
    segment_ids = packed_rows(rng, 4, L, longest or L)
    prompt = (rng.random((4, L)) < 0.5).astype(np.int32) if prompts else None
    dense = np.asarray(AttentionMask.packed(jnp.asarray(segment_ids), prompt, longest).dense_BxLxS)
    ranges = key_ranges(L, 16, longest, prompts)
    assert [(q0, q1) for q0, q1, _, _ in ranges] == [(q, min(L, q + 16)) for q in range(0, L, 16)]
    for q0, q1, k0, k1 in ranges:
        outside = np.ones(L, bool)
        outside[k0:k1] = False
        assert not dense[:, q0:q1, outside].any(), (q0, q1, k0, k1)
    # Causal, unknown length: keys [0, q1). Known length 23: back to q0 - 22. Prompts: forward too.
    if not prompts:
        assert ranges[3][2:] == ((0, 64) if not longest else (max(0, 48 - longest + 1), 64))
    else:
        assert ranges[3][2:] == ((0, L) if not longest else (48 - 22, 64 + 22))


# With prompts (the causal mask plus two-way prompt blocks) in the default run, with and without a
# longest-sequence promise; the causal-only variants (~5 s each) in the slow run.
@pytest.mark.parametrize("n_kv,longest,prompts", [
    pytest.param(2, 20, False, marks=pytest.mark.slow), (1, 20, True), pytest.param(4, 0, False, marks=pytest.mark.slow), (2, 0, True),
])
def test_blocked_attention_equals_the_full_computation(n_kv, longest, prompts):
    """Block skipping against the full square, on packed rows with padding, outputs and grads."""
    from lmjax.models.attention import AttentionMask, blocked_attention

    rng = np.random.default_rng(n_kv)
    B, L, D = 3, 70, 8
    segment_ids = jnp.asarray(packed_rows(rng, B, L, longest or L))
    prompt = jnp.asarray((rng.random((B, L)) < 0.4).astype(np.int32)) if prompts else None
    mask = AttentionMask.packed(segment_ids, prompt, longest)
    q = rng.normal(size=(B, L, N_HEADS, D)).astype(np.float32)
    k = rng.normal(size=(B, L, n_kv, D)).astype(np.float32)
    v = rng.normal(size=(B, L, n_kv, D)).astype(np.float32)
    cotangent = rng.normal(size=q.shape).astype(np.float32)
    blocked = functools.partial(blocked_attention, xla_attention, block=16)
    np.testing.assert_allclose(
        np.asarray(blocked(q, k, v, mask)), naive_attention_np(q, k, v, np.asarray(mask.dense_BxLxS)), rtol=1e-5, atol=1e-5
    )
    assert_same_gradients(blocked, xla_attention, q, k, v, mask, cotangent)


def test_scored_keys_count_the_blocks():
    from lmjax.models.attention import scored_keys_per_query

    assert scored_keys_per_query(256, 0) == 256
    # Causal blocks of 64: 64 x (64 + 128 + 192 + 256) scores over 256 queries.
    assert scored_keys_per_query(256, 64) == 64 * (64 + 128 + 192 + 256) / 256
    # Longest sequence 87 (86 back): the last two blocks start 86 before their first query.
    assert scored_keys_per_query(256, 64, 87) == 64 * (64 + 128 + (192 - 42) + (256 - 106)) / 256


@pytest.mark.parametrize("name,block,prompts", [("xla", 0, False), ("xla", 16, False), ("xla", 16, True),
                                                ("cudnn", 16, True), ("pallas", 0, True)])
def test_attend_over_packed_rows_matches_naive(name, block, prompts):
    """The dispatcher, whatever it picks (the full square, block skipping, cudnn's XLA form off
    GPU, the flash kernel in interpret mode), computes the naive attention of the dense mask."""
    from lmjax.models.attention import AttentionMask, attend

    rng = np.random.default_rng(block + prompts)
    B, L, D = 2, 40, 8
    segment_ids = jnp.asarray(packed_rows(rng, B, L, 12))
    prompt = jnp.asarray(rng.random((B, L)) < 0.4) if prompts else None
    mask = AttentionMask.packed(segment_ids, prompt, 12)
    q = rng.normal(size=(B, L, N_HEADS, D)).astype(np.float32)
    k, v = (rng.normal(size=(B, L, 2, D)).astype(np.float32) for _ in range(2))
    out = attend(q, k, v, mask, name, block=block)
    # f32 against a float64 loop: the tolerance of test_matches_naive_per_head_softmax.
    np.testing.assert_allclose(np.asarray(out), naive_attention_np(q, k, v, np.asarray(mask.dense_BxLxS)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["xla", "pallas"])
def test_attend_against_a_cache_runs_xla_without_blocks(name):
    """A cache mask (chunk queries against every slot): pallas falls back to xla, and `block`
    does not apply (the slots are not a packed row): bit for bit the xla result."""
    from lmjax.models.attention import AttentionMask, attend

    rng = np.random.default_rng(1)
    B, L, S, D = 2, 3, 20, 8
    positions = jnp.asarray([[4, 5, 6], [10, 11, 12]], jnp.int32)
    mask = AttentionMask.cache(positions, S)
    q = rng.normal(size=(B, L, N_HEADS, D)).astype(np.float32)
    k, v = (rng.normal(size=(B, S, 1, D)).astype(np.float32) for _ in range(2))
    out = np.asarray(attend(q, k, v, mask, name, block=2))
    np.testing.assert_array_equal(out, np.asarray(xla_attention(q, k, v, mask)))
    np.testing.assert_allclose(out, naive_attention_np(q, k, v, np.asarray(mask.dense_BxLxS)), rtol=1e-5, atol=1e-5)


def test_attend_takes_a_dense_mask_and_names_unknown_implementations():
    from lmjax.models.attention import attend

    q, k, v, mask = random_qkvm(seed=2, n_kv=2)
    np.testing.assert_array_equal(np.asarray(attend(q, k, v, mask, "xla", block=4)),
                                  np.asarray(xla_attention(q, k, v, mask)))
    with pytest.raises(ValueError, match="choose one of: cudnn, pallas, xla"):
        attend(q, k, v, mask, "flash")


def test_a_kv_cache_update_writes_one_layer_at_the_slots_and_drops_padding():
    from lmjax.models.kv_cache import KVCache

    layers, B, S, K, D = 3, 2, 6, 1, 4
    rng = np.random.default_rng(0)
    k_all, v_all = (jnp.asarray(rng.normal(size=(layers, B, S, K, D)), jnp.float32) for _ in range(2))
    k, v = (rng.normal(size=(B, 2, K, D)).astype(np.float32) for _ in range(2))
    slots = jnp.asarray([[2, 3], [0, S]])  # row 1's second token is padding: slot S is dropped
    k_layer, v_layer, (k_new, v_new) = KVCache(k_all, v_all).update(1, slots, k, v, n_slots=5)
    want_k, want_v = np.array(k_all), np.array(v_all)
    want_k[1, 0, 2:4], want_v[1, 0, 2:4] = k[0], v[0]
    want_k[1, 1, 0], want_v[1, 1, 0] = k[1, 0], v[1, 0]
    np.testing.assert_array_equal(np.asarray(k_new), want_k)
    np.testing.assert_array_equal(np.asarray(v_new), want_v)
    np.testing.assert_array_equal(np.asarray(k_layer), want_k[1, :, :5])
    np.testing.assert_array_equal(np.asarray(v_layer), want_v[1, :, :5])


def test_a_paged_cache_reads_and_writes_what_a_contiguous_one_does_through_its_page_table():
    """Lanes' slots scattered over shuffled pages, one lane with a page missing at its end:
    every write lands where the page table says, reads equal the contiguous cache's slots,
    and writes to a slot without a page are dropped."""
    from lmjax.models.kv_cache import KVCache, PagedKVCache

    layers, B, P, per_lane, K, D = 2, 3, 4, 3, 2, 2
    S, n_pages = P * per_lane, B * per_lane + 1
    rng = np.random.default_rng(1)
    table = rng.permutation(n_pages)[: B * per_lane].reshape(B, per_lane)
    table[2, 2] = n_pages  # lane 2 has no third page
    contiguous = np.asarray(rng.normal(size=(2, layers, B, S, K, D)), np.float32)
    contiguous[:, :, 2, 2 * P:] = 0  # what a missing page reads as
    pages = np.zeros((2, layers, K, n_pages, P, D), np.float32)  # the kernels' layout: kv heads first
    for b in range(B):
        for i, page in enumerate(table[b]):
            if page < n_pages:
                pages[:, :, :, page] = contiguous[:, :, b, i * P:(i + 1) * P].transpose(0, 1, 3, 2, 4)
    paged = PagedKVCache(jnp.asarray(pages[0]), jnp.asarray(pages[1]), jnp.asarray(table, jnp.int32))
    flat = KVCache(jnp.asarray(contiguous[0]), jnp.asarray(contiguous[1]))
    k, v = (rng.normal(size=(B, 3, K, D)).astype(np.float32) for _ in range(2))
    slots = jnp.asarray([[3, 4, 5], [9, 10, S], [7, 8, 9]])  # lane 2's slot 8 and 9 have no page
    got_k, got_v, new_paged = paged.update(1, slots, k, v, n_slots=11)
    kept = np.array(slots)
    kept[2][kept[2] >= 2 * P] = S  # the contiguous cache drops those writes too
    want_k, want_v, new_flat = flat.update(1, jnp.asarray(kept), k, v, 11)
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(want_k))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    assert got_k.shape == (B, 11, K, D)
    # read back every layer through a fresh update that writes nothing
    nothing = jnp.full((B, 1), S)
    for layer in range(layers):
        a = new_paged.update(layer, nothing, k[:, :1], v[:, :1], S)
        b_ = new_flat.update(layer, nothing, k[:, :1], v[:, :1], S)
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b_[0]))
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b_[1]))


def test_the_projection_is_swappable_and_keeps_the_parameter_paths():
    """Attention builds wq, wk, wv and wo through `projection`: a replacement (here one that
    doubles its output, standing in for quantized weights) changes every one of them and
    nothing else."""
    import flax.linen as nn

    from lmjax.models.attention import Attention, AttentionMask
    from lmjax.models.layers import Projection, rope_angles

    class Doubled(Projection):
        def __call__(self, x):
            return 2 * super().__call__(x)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 16)), jnp.float32)
    rope = rope_angles(jnp.broadcast_to(jnp.arange(5), (2, 5)), 8, 10000.0)
    mask = AttentionMask.packed(jnp.ones((2, 5), jnp.int32))
    plain = Attention(16, 2, 1, 1, "normal")
    doubled = Attention(16, 2, 1, 1, "normal", projection=Doubled)
    params = plain.init(jax.random.PRNGKey(0), x, *rope, mask)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        doubled.init(jax.random.PRNGKey(0), x, *rope, mask))
    assert set(nn.meta.unbox(params)["params"]) == {"wq", "wk", "wv", "wo"}
    # q and k doubled scale the scores by 4: the same attention as q scaled by 4 once.
    scaled = nn.meta.unbox(params)  # a new tree: params stay as they are
    scaled["params"]["wq"]["kernel"] = scaled["params"]["wq"]["kernel"] * 4
    scaled["params"]["wv"]["kernel"] = scaled["params"]["wv"]["kernel"] * 2
    scaled["params"]["wo"]["kernel"] = scaled["params"]["wo"]["kernel"] * 2
    np.testing.assert_allclose(np.asarray(doubled.apply(params, x, *rope, mask)),
                               np.asarray(plain.apply(scaled, x, *rope, mask)), rtol=1e-5, atol=1e-6)
