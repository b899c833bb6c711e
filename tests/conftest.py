import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavy end-to-end tests, left out unless asked for with -m slow (CI runs them)")


def pytest_collection_modifyitems(config, items):
    """Without a -m expression, the slow tests are left out, so the default run stays short."""
    if config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def tiny_facts_overrides(**extra):
    """A facts run small enough for unit tests: 8 people, a 1-layer d=32 model, a few steps."""
    base = {
        "data.num_people": 8, "data.num_unseen": 4, "model.dim": 32, "model.n_layers": 1,
        "model.n_heads": 2, "model.n_kv_heads": 1, "model.mlp_hidden": 64, "train.steps": 12,
        "train.batch_size": 4, "train.seq_len": 96, "train.log_every": 2, "train.eval_every": 6,
        "checkpoint.every": 4, "checkpoint.keep": 5, "checkpoint.async_save": False,
        "logging.progress_bar": False, "optim.warmup_steps": 2, "optim.lr": 3e-3,
        "eval.recall": False,  # generation-based recall is tested where it is the subject
    }
    base.update(extra)
    return base


def tiny_facts_recipe(**extra):
    """The tiny facts run as the recipe's ConfigDict (unchecked, mutable)."""
    from lmjax.config import load_config_file

    return load_config_file(ROOT / "configs" / "facts.py", tiny_facts_overrides(**extra).items())


def tiny_facts_config(**extra):
    """The tiny facts run, checked (lmjax.config.RunConfig)."""
    from lmjax.config import parse_config

    return parse_config(tiny_facts_recipe(**extra))


def build_task(config, workdir):
    """The task of a checked config, as the run builder makes it (examples, tokenizer, evaluators)."""
    from lmjax.tasks import TASKS

    return TASKS.get(config.data.name).build(
        config.data, workdir=workdir, seq_len=config.train.seq_len, eval_cfg=config.eval, vocab_size=config.model.vocab_size
    )


def cli(*args):
    """argv for `python -m lmjax.main` with the repo importable."""
    return [sys.executable, "-m", "lmjax.main", *args]


@pytest.fixture
def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tiny_smollm_folder(folder):
    """A Hugging Face folder holding a random 2-layer Llama (GQA, tied embeddings) with SmolLM2's
    vocabulary and real tokenizer files: imported models end to end, in seconds."""
    import torch
    import transformers

    from lmjax.data.tokenizers import pretrained_tokenizer
    from lmjax.interop.bundled import smollm2_gguf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # unit-scale weights: a wrong import changes losses and logits visibly
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[1] ** 0.5)
    model.save_pretrained(folder)
    pretrained_tokenizer(smollm2_gguf()).save_hf_files(folder)
    return folder


def unit_scale_weights(model):
    """Refill an HF Llama's weights in place. HF's own init (std 0.02, unit norms) gives near-zero
    logits, where a 1e-4 agreement proves little; unit-scale weights and uneven norm scales make
    every wrong transpose visible."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)


def write_llama_gguf(path, tensors, *, layers, dim, ffn, heads, kv_heads, vocab, rope_base, arch="llama", extra=None,
                     stored=None):
    """A GGUF file with a llama header and `tensors` (GGUF name -> float array, numpy order);
    `stored(name, array)` may give (raw bytes, GGMLQuantizationType) to store a tensor quantized."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list([f"t{i}".encode() for i in range(vocab)])
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    for name, array in tensors.items():
        raw = stored(name, array) if stored else None
        if raw is None:
            writer.add_tensor(name, np.ascontiguousarray(array))
        else:
            writer.add_tensor(name, raw[0], raw_dtype=raw[1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
