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
        both_prompt = prompt_BxL[:, :, None] & prompt_BxL[:, None, :]
        may_attend = may_attend | both_prompt
    padding = (segment_ids_BxL == 0)[:, :, None]
    diagonal = jnp.eye(L, dtype=bool)[None]
    return (same_segment & may_attend & ~padding) | (padding & diagonal)


def causal_mask(batch: int, length: int):
    """Plain causal mask for unpacked sequences."""
    return attention_mask(jnp.ones((batch, length), dtype=jnp.int32))
