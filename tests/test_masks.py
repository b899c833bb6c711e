import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.models.masks import attention_mask, cache_attention_mask


def naive_mask(segment_ids_BxL, prompt_BxL=None):
    """The rule spelled out one (query, key) pair at a time."""
    B, L = segment_ids_BxL.shape
    if prompt_BxL is None:
        prompt_BxL = np.zeros((B, L), dtype=bool)
    mask = np.zeros((B, L, L), dtype=bool)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                seg_i, seg_j = segment_ids_BxL[b, i], segment_ids_BxL[b, j]
                if seg_i == 0:  # padding: only itself, so its softmax row is well defined
                    mask[b, i, j] = i == j
                elif seg_i == seg_j:
                    both_prompt = prompt_BxL[b, i] and prompt_BxL[b, j]
                    mask[b, i, j] = j <= i or both_prompt
    return mask


def packed_rows(rng, batch, length):
    """Segments 1, 2, ... of random lengths packed left to right, padding (0) filling the rest;
    the prompt is a random-length prefix of each segment."""
    segment_ids = np.zeros((batch, length), dtype=np.int32)
    prompt = np.zeros((batch, length), dtype=bool)
    for b in range(batch):
        start, seg = 0, 1
        while start < length and rng.random() < 0.85:
            n = int(rng.integers(1, length // 2 + 1))
            end = min(start + n, length)
            segment_ids[b, start:end] = seg
            prompt[b, start : start + int(rng.integers(0, end - start + 1))] = True
            start, seg = end, seg + 1
    return segment_ids, prompt


@pytest.mark.parametrize("seed", range(4))
def test_packed_segments_with_padding_match_naive(seed):
    rng = np.random.default_rng(seed)
    segment_ids, prompt = packed_rows(rng, batch=6, length=24)
    assert (segment_ids == 0).any() and (segment_ids > 1).any()  # the cases worth testing occur
    np.testing.assert_array_equal(np.asarray(attention_mask(segment_ids)), naive_mask(segment_ids))
    np.testing.assert_array_equal(
        np.asarray(attention_mask(segment_ids, prompt)), naive_mask(segment_ids, prompt)
    )


@pytest.mark.parametrize("seed", range(3))
def test_arbitrary_ids_and_prompt_flags_match_naive(seed):
    # Not what the packer produces (ids interleave, padding sits mid-row, prompt flags are
    # scattered and set on padding too), but the rule must hold pair by pair all the same.
    rng = np.random.default_rng(100 + seed)
    segment_ids = rng.integers(0, 4, size=(4, 17)).astype(np.int32)
    prompt = rng.random((4, 17)) < 0.5
    np.testing.assert_array_equal(
        np.asarray(attention_mask(segment_ids, prompt)), naive_mask(segment_ids, prompt)
    )


def test_every_row_attends_somewhere_and_itself():
    rng = np.random.default_rng(7)
    segment_ids, prompt = packed_rows(rng, batch=8, length=32)
    mask = np.asarray(attention_mask(segment_ids, prompt))
    assert mask.any(axis=-1).all()
    assert np.diagonal(mask, axis1=1, axis2=2).all()


def test_one_sequence_a_row_is_lower_triangular():
    mask = np.asarray(attention_mask(np.ones((3, 9), np.int32)))
    assert mask.shape == (3, 9, 9) and mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, np.broadcast_to(np.tril(np.ones((9, 9), dtype=bool)), (3, 9, 9)))


def test_cache_mask_equals_the_training_mask_for_one_sequence():
    from lmjax.models.masks import cache_attention_mask

    rng = np.random.default_rng(5)
    L, P, S = 12, 5, 16
    prompt = np.arange(L) < P
    training = naive_mask(np.ones((1, L), np.int32), prompt[None])[0]
    # Prefill the prompt in one chunk, then the rest in chunks of random sizes.
    start = 0
    for size in [P] + list(np.diff([P, *sorted(rng.choice(np.arange(P + 1, L), 3, replace=False)), L])):
        positions = np.arange(start, start + size)[None]
        got = np.asarray(cache_attention_mask(positions, S, prompt[None, start : start + size]))[0]
        np.testing.assert_array_equal(got[:, :L], training[start : start + size])
        assert not got[:, L:].any()
        start += size


def test_int32_prompt_flags_give_boolean_masks_that_cudnn_accepts():
    """The pipeline's prompt flags are int32; the masks must still be boolean (cudnn's
    dot_product_attention rejects any other dtype) and equal to the boolean-flag masks."""
    segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 0]], jnp.int32)
    prompt = jnp.asarray([[1, 1, 0, 1, 0, 0]], jnp.int32)
    dense = attention_mask(segment_ids, prompt)
    assert dense.dtype == jnp.bool_
    np.testing.assert_array_equal(dense, attention_mask(segment_ids, prompt.astype(bool)))
    positions = jnp.asarray([[0, 1, 2, 3]], jnp.int32)
    cached = cache_attention_mask(positions, 6, jnp.asarray([[1, 1, 0, 0]], jnp.int32))
    assert cached.dtype == jnp.bool_
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 6, 2, 8)) for i in range(3))
    out = jax.nn.dot_product_attention(q, k, v, mask=dense[:, None], implementation="xla")
    assert out.shape == q.shape
