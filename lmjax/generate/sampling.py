"""Samplers: pure functions of (logits, key, per-lane parameters).

Every lane has its own temperature, top-k, top-p and min-p, so one batch can mix greedy and
sampled requests. The filters apply in this order, each to what the previous one left:
temperature scaling, top-k (the k most likely tokens), top-p (the smallest set of most likely
tokens whose probability, renormalised after top-k, reaches p), min-p (tokens at least
min_p times as likely as the most likely one). `filtered_probs` is the distribution that
`sample` draws from, exposed so tests can compare it with a reference.
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class SamplingParams:
    """Per-lane arrays [B]. temperature 0 = greedy; top_k 0, top_p 1 and min_p 0 = off."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array

    @classmethod
    def for_lanes(cls, lanes, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0):
        def filled(value, dtype):
            return np.full((lanes,), value, dtype)

        return cls(filled(temperature, np.float32), filled(top_k, np.int32), filled(top_p, np.float32), filled(min_p, np.float32))


def check_sampling(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0):
    """Raise ValueError with the valid range for a bad sampling parameter."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be a whole number >= 0 (0 = off), got {top_k}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}.")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1] (0 = off), got {min_p}.")


def _sorted_filtered(logits_BxV, params: SamplingParams):
    """(log-probabilities sorted high to low with filtered tokens at -inf, the sort order)."""
    V = logits_BxV.shape[-1]
    temperature = jnp.maximum(params.temperature, 1e-6)[:, None]
    sorted_logits, order = jax.lax.top_k(logits_BxV / temperature, V)
    rank = jnp.arange(V)[None, :]
    top_k = jnp.where(params.top_k > 0, params.top_k, V)[:, None]
    logp = jax.nn.log_softmax(jnp.where(rank < top_k, sorted_logits, -jnp.inf), axis=-1)
    probs = jnp.exp(logp)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < params.top_p[:, None]) & (probs >= params.min_p[:, None] * probs[:, :1])
    keep = keep.at[:, 0].set(True)  # the most likely token always survives
    return jax.nn.log_softmax(jnp.where(keep, logp, -jnp.inf), axis=-1), order


def filtered_probs(logits_BxV, params: SamplingParams):
    """[B, V] the probabilities `sample` draws from (one-hot at the argmax for greedy lanes)."""
    logp_sorted, order = _sorted_filtered(logits_BxV, params)
    probs = jnp.zeros_like(logits_BxV).at[jnp.arange(logits_BxV.shape[0])[:, None], order].set(jnp.exp(logp_sorted))
    greedy = jax.nn.one_hot(jnp.argmax(logits_BxV, axis=-1), logits_BxV.shape[-1], dtype=probs.dtype)
    return jnp.where((params.temperature == 0)[:, None], greedy, probs)


def sample(logits_BxV, keys_B, params: SamplingParams):
    """[B] int32 tokens; lane b uses only keys_B[b], so lanes never influence each other."""
    greedy = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def stochastic():
        logp_sorted, order = _sorted_filtered(logits_BxV, params)
        choice = jax.vmap(jax.random.categorical)(keys_B, logp_sorted)
        drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(params.temperature == 0, greedy, drawn)

    # Sorting the vocabulary costs more than the rest of a small model's step: skip it when
    # every lane is greedy.
    return jax.lax.cond(jnp.all(params.temperature == 0), lambda: greedy, stochastic)
