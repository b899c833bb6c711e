"""SmolLM2-135M-Instruct, imported from its GGUF, trained further on local text or chats.

    python -m lmjax.main --config=configs/smollm.py                          # continue pretraining on Shakespeare
    python -m lmjax.main --config=configs/smollm.py --config.data.source=notes.txt
    python -m lmjax.main --config=configs/smollm.py --config.data.source=chats.jsonl --config.data.loss_mask=assistant

The model's shape and tokenizer come from the weights (`checkpoint.init_from`, a GGUF file or a
Hugging Face Llama folder); `data.loss_mask=all` puts the loss on every token, `assistant` (chat
JSONL only) on the assistant's tokens. Sized for a 2-core CPU: a few steps of short rows.
"""
from lmjax.config import base_recipe
from lmjax.interop.bundled import smollm2_gguf


def get_config():
    c = base_recipe("text")
    c.checkpoint.init_from = smollm2_gguf()
    c.model = dict(  # the shape (dim, layers, heads, vocabulary, ...) is read from init_from
        init="normal", remat="none", scan_layers=True, param_dtype="float32", compute_dtype="float32",
        prefix_lm=False, attention_block=0,
    )
    c.data.update(source="shakespeare", loss_mask="all")
    c.optim.update(lr=3e-5, warmup_steps=4, weight_decay=0.0, clip_norm=1.0)
    c.train.update(steps=20, batch_size=4, seq_len=128, log_every=5, eval_every=10)
    c.eval.update(batch_size=8, max_batches=2)
    c.checkpoint.update(every=10, keep=1)
    return c
