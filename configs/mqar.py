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
from lmjax.config import base_recipe


def get_config():
    c = base_recipe("mqar")  # data: V=512, L=64, 4 kv pairs, 100k training sequences
    c.model = dict(
        dim=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=256, vocab_size=c.data.get_ref("vocab_size"),
        tie_embeddings=False, rope_base=10000.0, norm_eps=1e-5, init="normal", remat="none",
        scan_layers=False, param_dtype="float32", compute_dtype="float32", prefix_lm=False, attention_block=64,
        # Recurrent families (--config.implementation.model=mamba | rnn): Mamba's SSM state size,
        # conv width, expansion, dt rank (0 = dim/16) and scan; the RNN's cell and width (0 = dim).
        d_state=16, d_conv=4, expand=2, dt_rank=0, scan="chunked", chunk_size=64, cell="hawk", width=0,
    )
    c.optim.update(lr=3e-3, clip_norm=1.0, warmup_steps=50)
    c.train.update(batch_size=64, eval_every=100, stop_when="eval/mqar_acc>=0.99")
    c.train.seq_len = c.data.get_ref("seq_len")
    c.eval.batch_size = 250
    c.checkpoint.every = 500
    return c
