"""GGUF files (llama.cpp) of the llama architecture -> lmjax Transformer parameters.

The `gguf` package reads the file and dequantizes its tensors (Q4_1, Q8_0, ... to float32, as
transformers' own GGUF loader does). Three things differ from a Hugging Face folder:

- Names: `blk.{i}.attn_q.weight` for `model.layers.{i}.self_attn.q_proj.weight` and so on
  (GGUF_NAMES); the tensors are renamed to HF names and go through lmjax.interop.hf's mapping.
- Shapes: GGUF lists a tensor's dimensions fastest-first (ggml's `ne`), the reverse of numpy's
  row-major shape; a weight of ne [in, out] is the numpy array [out, in], HF's layout.
- RoPE: llama.cpp rotates interleaved pairs (2j, 2j+1) of each head, HF and lmjax rotate halves
  (j, j + D/2). Its converter therefore permutes the rows of q and k within each head:
  HF row `half * D/2 + j` is stored at row `2 * j + half`. `rotate_half_rows` undoes that.

Config comes from the metadata (`llama.block_count`, `llama.embedding_length`, ...); the
vocabulary is the token list's length; no `output.weight` tensor means tied embeddings.
"""
from pathlib import Path

import jax
import numpy as np

from lmjax.interop.hf import params_from_hf_tensors
from lmjax.models.transformer import TransformerConfig

ARCH = "llama"
# GGUF name inside `blk.{i}.` -> HF name inside `model.layers.{i}.`
GGUF_BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GGUF_OUTER_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path):
    """A gguf.GGUFReader over `path` (memory-mapped: nothing is dequantized yet)."""
    from lmjax.extras import require

    require("gguf", "interop")
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {str(path)!r}.")
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError) as error:  # a wrong magic number, a truncated file
        raise ValueError(f"{str(path)!r} is not a readable GGUF file ({error}).") from None


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _as_written(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5, not 9.99999974e-06),
    so configs and exports read like the original model's."""
    return float(str(np.float32(value)))


def config_from_gguf(reader, *, scan_layers: bool = True, param_dtype: str = "float32", where: str = "the GGUF file") -> TransformerConfig:
    """A TransformerConfig from a GGUF's metadata; ValueError (one line) for anything else than
    a llama-architecture model with plain RoPE."""
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"{where} holds a {arch!r} model; lmjax imports GGUF files of the {ARCH!r} architecture only.")

    def need(key):
        value = _field(reader, f"{ARCH}.{key}")
        if value is None:
            raise ValueError(f"{where} lacks the metadata key {ARCH}.{key}.")
        return value

    dim, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(_field(reader, f"{ARCH}.attention.head_count_kv", heads))
    if dim % heads or heads % kv_heads:
        raise ValueError(f"{where}: embedding_length {dim} with {heads} heads and {kv_heads} kv heads is not supported.")
    head_dim = dim // heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        value = _field(reader, f"{ARCH}.{key}")
        if value is not None and int(value) != head_dim:
            raise ValueError(f"{where}: {ARCH}.{key}={value} is not supported; lmjax rotates and attends over whole heads of {head_dim}.")
    if _field(reader, f"{ARCH}.expert_count", 0):
        raise ValueError(f"{where} is a mixture-of-experts model, which lmjax does not import yet.")
    scaling = _field(reader, f"{ARCH}.rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise ValueError(f"{where} uses RoPE scaling ({scaling or 'rope_freqs'}), which lmjax does not import yet.")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else _field(reader, f"{ARCH}.vocab_size")
    if vocab is None:
        raise ValueError(f"{where} has neither a token list nor {ARCH}.vocab_size.")
    return TransformerConfig(
        vocab_size=int(vocab), dim=dim, n_layers=int(need("block_count")), n_heads=heads, n_kv_heads=kv_heads,
        mlp_hidden=int(need("feed_forward_length")),
        tie_embeddings="output.weight" not in {t.name for t in reader.tensors},
        rope_base=_as_written(_field(reader, f"{ARCH}.rope.freq_base", 10000.0)),
        norm_eps=_as_written(need("attention.layer_norm_rms_epsilon")),
        scan_layers=scan_layers, param_dtype=param_dtype,
    )


def hf_name(gguf_name: str):
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for a name lmjax
    has no place for."""
    if gguf_name in GGUF_OUTER_NAMES:
        return GGUF_OUTER_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}"
    return None


def rotate_half_rows(weight_OxI, n_heads: int):
    """Rows of a q or k projection from llama.cpp's interleaved-pair order to rotate-half order.

    Within each head of D rows, GGUF row 2j + half holds HF row half * D/2 + j: view the rows as
    [heads, D/2, 2] (j, half), swap to [heads, 2, D/2] (half, j), flatten back.
    """
    out_rows, rest = weight_OxI.shape[0], weight_OxI.shape[1:]
    d = out_rows // n_heads
    return weight_OxI.reshape(n_heads, d // 2, 2, *rest).swapaxes(1, 2).reshape(weight_OxI.shape)


def dequantized(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (row-major) order: ggml's `ne` reversed."""
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def load_gguf(path, *, scan_layers: bool = True, param_dtype: str = "float32"):
    """(TransformerConfig, params) of a llama-architecture GGUF file, dequantized; params on the
    default device, in `param_dtype`, laid out for `scan_layers`."""
    reader = open_gguf(path)
    where = str(path)
    cfg = config_from_gguf(reader, scan_layers=scan_layers, param_dtype=param_dtype, where=where)
    by_hf_name = tensors_by_hf_name(reader, where)
    params = params_from_hf_tensors(cfg, lambda name: hf_rows(name, dequantized(by_hf_name[name]), cfg), by_hf_name, where=where)
    return cfg, jax.device_put(params)


def tensors_by_hf_name(reader, where: str) -> dict:
    """HF name -> the file's tensor; a tensor lmjax has no place for is a ValueError naming it."""
    by_hf_name, unknown = {}, []
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            unknown.append(tensor.name)
        by_hf_name[name] = tensor
    if unknown:
        raise ValueError(f"{where} has tensor(s) lmjax's Llama has no place for: {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}.")
    return by_hf_name


def hf_rows(name: str, rows_OxN, cfg):
    """An array with one row per output row of tensor `name` (a weight, or its block codes,
    scales or minimums) in HF's row order: q and k rows un-permuted (`rotate_half_rows`)."""
    if name.endswith("self_attn.q_proj.weight"):
        return rotate_half_rows(rows_OxN, cfg.n_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return rotate_half_rows(rows_OxN, cfg.n_kv_heads)
    return rows_OxN
