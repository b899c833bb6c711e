"""Multi-query associative recall (Zoology's MQAR): recall the value bound to each queried key.

    python -m lmjax.main --config=configs/mqar.py
    python -m lmjax.main --config=configs/mqar.py --config.data.seq_len=256 --config.data.num_kv_pairs=16
    python -m lmjax.main --config=configs/mqar.py --config.data.variant=forgetting

Default: sequences of 64 tokens with 4 key-value pairs, a 2-layer attention model of width 64,
trained on fresh generated sequences until per-token accuracy at query positions
(`eval/mqar_acc`) reaches 99%. Zoology's default vocabulary is 8,192; 512 keeps the output
layer small so the run takes minutes on a CPU (`--config.data.vocab_size=8192` for Zoology's).
`model.vocab_size` and `train.seq_len` follow `data.vocab_size` and `data.seq_len`.
Other families: `--config.implementation.model=mamba` or `=rnn --config.model.cell=hawk|mingru|minlstm`.
"""
from ml_collections import config_dict


def get_config():
    c = config_dict.ConfigDict()
    c.seed = 0
    c.implementation = dict(model="transformer", attention="xla", profiler="none")
    c.data = dict(
        name="mqar", vocab_size=512, seq_len=64, num_kv_pairs=4, num_train=100_000, num_eval=1000,
        variant="standard",  # standard | forgetting
        num_reassigned=2,  # forgetting only: keys bound again, later, to a new value
        power_a=0.01, seed=0,
        input_shards=0,  # 0 = one per data-parallel process; batches depend on it, like on the seed
    )
    c.model = dict(
        dim=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=256, vocab_size=c.data.get_ref("vocab_size"),
        tie_embeddings=False, rope_base=10000.0, norm_eps=1e-5, init="normal", remat="none",
        scan_layers=False, param_dtype="float32", compute_dtype="float32", prefix_lm=False, attention_block=64,
        # Recurrent families (--config.implementation.model=mamba | rnn): Mamba's SSM state size,
        # conv width, expansion, dt rank (0 = dim/16) and scan; the RNN's cell and width (0 = dim).
        d_state=16, d_conv=4, expand=2, dt_rank=0, scan="chunked", chunk_size=64, cell="hawk", width=0,
    )
    c.optim = dict(
        lr=3e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
        schedule="cosine", warmup_steps=50, min_lr_ratio=0.1, decay_fraction=0.2, grad_accum=1,
    )
    c.train = dict(
        steps=3000, batch_size=64, seq_len=c.data.get_ref("seq_len"), log_every=25, eval_every=100,
        stop_when="eval/mqar_acc>=0.99",
    )
    c.eval = dict(batch_size=250)
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
    c.checkpoint = dict(every=500, keep=2, async_save=True)
    return c
