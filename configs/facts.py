"""The facts task: memorise N people x 4 attributes in the weights, or learn to look them up.

    python -m lmjax.main --config=configs/facts.py                        # in-weight
    python -m lmjax.main --config=configs/facts.py --config.data.mode=tool  # in-tool

Default: the original codebase's small in-weight setting (256 people, 1,024 facts, byte tokens,
2 layers, 2 heads, d=64, ~165k parameters, batch 128, AdamW 1e-3, wd 0.1, cosine).
"""
from ml_collections import config_dict


def get_config():
    c = config_dict.ConfigDict()
    c.seed = 0
    c.implementation = dict(model="transformer", attention="xla", profiler="none")
    c.model = dict(
        dim=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=256, vocab_size=260,
        tie_embeddings=False, rope_base=10000.0, norm_eps=1e-5, init="normal", remat="none",
        scan_layers=True, param_dtype="float32", compute_dtype="float32",
    )
    c.data = dict(
        name="facts", mode="weights", num_people=256, num_unseen=64, alpha=0.0, seed=0,
        include_biographies=False, pack=True, cache_dir="",  # "" = WORKDIR/data
    )
    c.optim = dict(
        lr=1e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
        schedule="cosine", warmup_steps=20, min_lr_ratio=0.1, decay_fraction=0.2, grad_accum=1,
    )
    c.train = dict(steps=400, batch_size=128, seq_len=256, log_every=25, eval_every=100, stop_at_metric="")
    c.eval = dict(batch_size=256)
    c.logging = dict(tensorboard=True, progress_bar=True, wandb=dict(mode="disabled", project="lmjax", entity="", name=""))
    c.checkpoint = dict(every=200, keep=2, async_save=True)
    return c
