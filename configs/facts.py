"""The facts task: memorise N people x 4 attributes in the weights, or learn to look them up.

    python -m lmjax.main --config=configs/facts.py                        # in-weight
    python -m lmjax.main --config=configs/facts.py --config.data.mode=tool  # in-tool

Default: the original codebase's small in-weight setting (256 people, 1,024 facts, byte tokens,
2 layers, 2 heads, d=64, ~165k parameters, ~128 dialogs a step, AdamW 1e-3, wd 0.1, cosine), with
dialogs packed into 256-token rows, and the run stops once teacher-forced answer accuracy
reaches 96% (`train.stop_when=""` trains all `train.steps`), then measures recall by free
generation. The 3,000-step cosine schedule fits in-tool training (~2,500 steps); in-weight
stops at ~900. Layers are unrolled (`model.scan_layers=False`): at 2 layers that is ~20% faster
on CPU than nn.scan. Attention runs in blocks of 64 queries (`model.attention_block`), each
against only the keys it can see: exact, and the step is ~20% faster at these 256-token rows.
"""
from ml_collections import config_dict


def get_config():
    c = config_dict.ConfigDict()
    c.seed = 0
    c.implementation = dict(model="transformer", attention="xla", profiler="none")
    c.model = dict(
        dim=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=256, vocab_size=260,
        tie_embeddings=False, rope_base=10000.0, norm_eps=1e-5, init="normal", remat="none",
        scan_layers=False, param_dtype="float32", compute_dtype="float32", prefix_lm=False, attention_block=64,
    )
    c.data = dict(
        name="facts", mode="weights", num_people=256, num_unseen=64, alpha=0.0, seed=0,
        include_biographies=False, pack=True, cache_dir="",  # "" = WORKDIR/data
        # In-tool only: qatool dialogs about people outside the database, so that copying the
        # tool's reply, not memorising it, is what training rewards.
        tool_practice_people=2048,
        input_shards=0,  # 0 = one per data-parallel process; batches depend on it, like on the seed
    )
    # No gradient clipping: clipping at 1.0 needs ~10% more steps to reach 95% here.
    c.optim = dict(
        lr=1e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=0.0,
        schedule="cosine", warmup_steps=20, min_lr_ratio=0.1, decay_fraction=0.2, grad_accum=1,
    )
    # Rows of 256 tokens hold ~3.5 packed dialogs: 32 rows ~ the original's 128 padded dialogs a step.
    c.train = dict(
        steps=3000, batch_size=32, seq_len=256, log_every=25, eval_every=50, stop_when="eval/qa_acc>=0.96",
    )
    # At the end: recall through free generation (tools executed in-tool) on every trained fact.
    c.eval = dict(batch_size=256, recall=True, recall_lanes=64, recall_chunk=16)
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
