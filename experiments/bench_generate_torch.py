"""PyTorch side of `bench_generate.py`: HF `LlamaForCausalLM.generate` on lmjax's weights.

torch and transformers come from the `test` extra; lmjax never imports this file.
"""
import statistics
import time

import jax
import numpy as np


def hf_llama_from_lmjax(params, cfg):
    """An HF Llama (f32, eager-free sdpa) holding exactly lmjax's parameters.

    lmjax kernels are [in..., out...] with heads split out; HF Linear weights are [out, in].
    Both use the rotate-half RoPE layout, so q/k need no permutation. Layers are stacked (scan).
    """
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=2048, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        attention_bias=False, mlp_bias=False, attn_implementation="sdpa", dtype=torch.float32,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    p = params
    if "layers" in p:  # nn.scan: one stacked array per parameter
        layers = p["layers"]
    else:  # unrolled layer_0 ... layer_{n-1}: stack them the same way
        layers = jax.tree.map(lambda *xs: np.stack(xs), *[p[f"layer_{i}"] for i in range(cfg.n_layers)])
    sd = {"model.embed_tokens.weight": p["embed"]["embedding"], "model.norm.weight": p["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = np.asarray(p["lm_head"]["kernel"]).T
    for i in range(cfg.n_layers):
        at, mlp = layers["attention"], layers["mlp"]
        pre = f"model.layers.{i}."
        flat = lambda k: np.asarray(k[i]).reshape(cfg.dim, -1).T  # noqa: E731
        sd[pre + "self_attn.q_proj.weight"] = flat(at["wq"]["kernel"])
        sd[pre + "self_attn.k_proj.weight"] = flat(at["wk"]["kernel"])
        sd[pre + "self_attn.v_proj.weight"] = flat(at["wv"]["kernel"])
        sd[pre + "self_attn.o_proj.weight"] = np.asarray(at["wo"]["kernel"][i]).reshape(-1, cfg.dim).T
        sd[pre + "mlp.gate_proj.weight"] = np.asarray(mlp["w_gate"]["kernel"][i]).T
        sd[pre + "mlp.up_proj.weight"] = np.asarray(mlp["w_up"]["kernel"][i]).T
        sd[pre + "mlp.down_proj.weight"] = np.asarray(mlp["w_down"]["kernel"][i]).T
        sd[pre + "input_layernorm.weight"] = layers["attention_norm"]["scale"][i]
        sd[pre + "post_attention_layernorm.weight"] = layers["mlp_norm"]["scale"][i]
    state = {k: torch.from_numpy(np.ascontiguousarray(np.asarray(v, np.float32))) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"Weight mapping mismatch: missing {missing}, unexpected {unexpected}.")
    if cfg.tie_embeddings:
        model.tie_weights()
    return model


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
