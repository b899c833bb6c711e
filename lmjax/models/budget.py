"""Parameter counts of the Llama-style transformer, and the width that meets a parameter budget.

For shape sweeps at a fixed number of parameters (the capacity study): give the layers and
heads, get the width. Counts are exact for `lmjax.models.transformer.Transformer` (no biases;
RMSNorm scales before attention, before the MLP and at the end; a SwiGLU MLP of three matrices).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ShapeCount:
    dim: int
    mlp_hidden: int
    params: int  # everything, embeddings included
    embedding_params: int  # input embedding + output head (0 extra when tied)

    @property
    def non_embedding_params(self) -> int:
        return self.params - self.embedding_params


def count_params(*, dim, n_layers, n_heads, n_kv_heads=None, mlp_hidden, vocab_size, tie_embeddings=False) -> ShapeCount:
    """The parameters of a Transformer with this shape, by part."""
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    head_dim = dim // n_heads
    attention = 2 * dim * dim + 2 * dim * n_kv_heads * head_dim  # q, o; k, v
    mlp = 3 * dim * mlp_hidden
    norms = 2 * dim
    embedding = vocab_size * dim * (1 if tie_embeddings else 2)
    total = n_layers * (attention + mlp + norms) + dim + embedding
    return ShapeCount(dim=dim, mlp_hidden=mlp_hidden, params=total, embedding_params=embedding)


def matched_width(budget: int, *, n_layers, n_heads, mlp_ratio=4, vocab_size=260, tie_embeddings=False,
                  min_head_dim=2, fit_mlp=False, max_dim=4096) -> ShapeCount:
    """The shape with `n_layers` and `n_heads` (MLP `mlp_ratio` x width) whose parameters,
    embeddings included, come closest to `budget`.

    The width is a multiple of 2 x n_heads: heads divide it and each head's width is even, as
    rotary embeddings need, and at least `min_head_dim`. Where that grid is coarse (many heads,
    narrow models) the match can miss by more than a few percent; the result carries its exact
    count, to report beside it. With `fit_mlp`, the MLP's hidden width is then set to the one
    that lands closest to the budget (its ratio to the width moves off `mlp_ratio`).
    """
    if budget <= 0 or n_layers < 1 or n_heads < 1:
        raise ValueError(f"budget, n_layers and n_heads must be positive, got {budget}, {n_layers}, {n_heads}.")
    step = 2 * n_heads

    def shape(dim):
        return count_params(dim=dim, n_layers=n_layers, n_heads=n_heads, mlp_hidden=mlp_ratio * dim,
                            vocab_size=vocab_size, tie_embeddings=tie_embeddings)

    smallest = step * -(-max(min_head_dim * n_heads, step) // step)
    candidates = [shape(dim) for dim in range(smallest, max_dim + 1, step)]
    best = min(candidates, key=lambda s: (abs(s.params - budget), s.dim))
    if not fit_mlp:
        return best
    per_hidden_unit = 3 * best.dim * n_layers
    hidden = max(1, round(best.mlp_hidden + (budget - best.params) / per_hidden_unit))
    return count_params(dim=best.dim, n_layers=n_layers, n_heads=n_heads, mlp_hidden=hidden,
                        vocab_size=vocab_size, tie_embeddings=tie_embeddings)
