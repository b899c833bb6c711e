"""lmjax/models/budget.py: parameter counts against the real model, widths against a brute-force search."""
import jax
import numpy as np
import pytest

from lmjax.models.budget import count_params, matched_width
from lmjax.models.transformer import Transformer, TransformerConfig


def real_count(**shape):
    """Parameters of the Transformer itself, by abstract initialisation (no weights computed)."""
    model = Transformer(TransformerConfig(**shape))
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32)))["params"]
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("shape", [
    dict(vocab_size=260, dim=24, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=96),
    dict(vocab_size=260, dim=32, n_layers=3, n_heads=4, n_kv_heads=1, mlp_hidden=70),
    dict(vocab_size=100, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=64, tie_embeddings=True),
])
def test_count_params_equals_the_models_own_count(shape):
    counted = count_params(**{k: v for k, v in shape.items()})
    assert counted.params == real_count(**shape)
    per_table = shape["vocab_size"] * shape["dim"]
    assert counted.embedding_params == (per_table if shape.get("tie_embeddings") else 2 * per_table)
    assert counted.non_embedding_params == counted.params - counted.embedding_params


@pytest.mark.parametrize("budget", [10_000, 40_000])
@pytest.mark.parametrize("n_layers,n_heads", [(1, 1), (2, 4), (8, 2)])
def test_matched_width_is_the_closest_legal_width(budget, n_layers, n_heads):
    got = matched_width(budget, n_layers=n_layers, n_heads=n_heads, min_head_dim=4)
    legal = [d for d in range(1, 512) if d % n_heads == 0 and (d // n_heads) % 2 == 0 and d // n_heads >= 4]
    counts = {d: count_params(dim=d, n_layers=n_layers, n_heads=n_heads, mlp_hidden=4 * d, vocab_size=260).params
              for d in legal}
    best = min(legal, key=lambda d: (abs(counts[d] - budget), d))
    assert (got.dim, got.mlp_hidden, got.params) == (best, 4 * best, counts[best])


@pytest.mark.parametrize("n_layers,n_heads", [(1, 2), (4, 1), (8, 2)])
def test_fit_mlp_lands_within_one_percent(n_layers, n_heads):
    for budget in (10_000, 20_000, 40_000, 80_000):
        fitted = matched_width(budget, n_layers=n_layers, n_heads=n_heads, min_head_dim=4, fit_mlp=True)
        plain = matched_width(budget, n_layers=n_layers, n_heads=n_heads, min_head_dim=4)
        assert fitted.dim == plain.dim
        assert abs(fitted.params - budget) <= max(0.01 * budget, abs(plain.params - budget))
        assert fitted.params == count_params(dim=fitted.dim, n_layers=n_layers, n_heads=n_heads,
                                             mlp_hidden=fitted.mlp_hidden, vocab_size=260).params


def test_bad_budget_is_an_error():
    with pytest.raises(ValueError, match="positive"):
        matched_width(0, n_layers=1, n_heads=1)
