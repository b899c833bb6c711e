"""Attention masks as boolean arrays [B, L, S]: True where query i may attend key j."""
import jax.numpy as jnp


def attention_mask(segment_ids_BxL, prompt_BxL=None):
    """Causal attention confined to each packed segment, optionally bidirectional inside prompts.

    `segment_ids_BxL`: packed-sequence ids; 0 marks padding, which attends only to itself so
    every softmax row stays well defined. `prompt_BxL` (prefix-LM): where both query and key are
    prompt tokens of the same segment, attention goes both ways; generated tokens stay causal.
    """
    L = segment_ids_BxL.shape[1]
    same_segment = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    causal = jnp.tril(jnp.ones((L, L), dtype=bool))[None]
    may_attend = causal
    if prompt_BxL is not None:
        prompt = prompt_BxL.astype(bool)  # the data pipeline's prompt flags are int32
        both_prompt = prompt[:, :, None] & prompt[:, None, :]
        may_attend = may_attend | both_prompt
    padding = (segment_ids_BxL == 0)[:, :, None]
    diagonal = jnp.eye(L, dtype=bool)[None]
    return (same_segment & may_attend & ~padding) | (padding & diagonal)


def cache_attention_mask(positions_BxL, cache_len: int, prompt_BxL=None):
    """Mask [B, L, S] of chunk queries against the S slots of a KV cache (generation).

    Slot j holds the token at position j. A query at position p sees slots j <= p; a prompt
    query (prefix-LM) also sees every prompt slot, the prompt being positions below the
    largest prompt position in the chunk. The whole prompt must therefore arrive in one chunk,
    which is what prefill does. Same rule as `attention_mask` for one unpacked sequence.
    """
    slots = jnp.arange(cache_len)[None, None, :]
    may_attend = slots <= positions_BxL[:, :, None]
    if prompt_BxL is not None:
        prompt = prompt_BxL.astype(bool)
        prompt_len_B = jnp.max(jnp.where(prompt, positions_BxL + 1, 0), axis=1)
        may_attend = may_attend | (prompt[:, :, None] & (slots < prompt_len_B[:, None, None]))
    return may_attend
