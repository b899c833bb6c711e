"""PyTorch side of `bench_generate.py`: HF `LlamaForCausalLM.generate` on lmjax's weights.

torch and transformers come from the `test` extra; lmjax never imports this file.
"""
import statistics
import time

import numpy as np


def hf_llama_from_lmjax(params, cfg):
    """An HF Llama (f32, sdpa attention) holding exactly lmjax's parameters: written by lmjax's own
    HF export (lmjax.interop.hf, tested against transformers) and loaded by transformers."""
    import tempfile

    import torch
    import transformers

    from lmjax.interop.hf import save_hf_folder

    with tempfile.TemporaryDirectory() as folder:
        save_hf_folder(folder, cfg, params, overwrite=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def hf_from_gguf(path):
    """transformers' own loading of a GGUF file (it dequantizes to f32 itself)."""
    import os

    import torch
    import transformers

    folder, name = os.path.split(os.path.abspath(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


def hf_generate(model, prompts, new_tokens, repeats):
    """(tokens [B, new_tokens], median seconds) of greedy `generate` with the KV cache."""
    import torch

    ids = torch.as_tensor(np.asarray(prompts), dtype=torch.long)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        out = model.generate(ids, **kwargs)  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            seconds.append(time.perf_counter() - start)
    return out[:, ids.shape[1]:].numpy(), statistics.median(seconds)
