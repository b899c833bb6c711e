"""Hugging Face Llama folders <-> lmjax Transformer parameters.

    FOLDER/config.json                    LlamaForCausalLM (model_type "llama")
    FOLDER/model.safetensors              one file, or shards named by model.safetensors.index.json
    FOLDER/tokenizer files                written by the tokenizer, when it knows how (save_hf_files)

HF Linear weights are [out, in]; lmjax kernels are [in..., out...] with the heads split out
(wq [E, H, D], wo [H, D, E]). HF Llama rotates halves of each head (rotate-half RoPE), as lmjax
does, so q and k carry over without a permutation. Supported: bias-free Llama with plain RoPE,
grouped-query attention, tied or untied embeddings. Refused, in one line: RoPE scaling,
attention or MLP biases, a head_dim other than hidden_size / heads, other architectures.

`params_from_hf_tensors` is the one place the name and layout mapping lives; the GGUF importer
(lmjax.interop.gguf) renames its tensors to HF names and goes through it too.
"""
import json
import math
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.interop import consolidated
from lmjax.interop.consolidated import flat_params
from lmjax.models.transformer import Transformer, TransformerConfig

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURE = "LlamaForCausalLM"
SUPPORTED = f"{ARCHITECTURE} (model_type 'llama')"

# lmjax name inside a block -> (HF name inside `model.layers.{i}.`, kernel axes that are HF's
# input axes: the weight is transposed and split at that axis; None: copied as is).
BLOCK_TENSORS = {
    "attention.wq.kernel": ("self_attn.q_proj.weight", 1),  # [E, H, D] <- [H*D, E]
    "attention.wk.kernel": ("self_attn.k_proj.weight", 1),  # [E, K, D] <- [K*D, E]
    "attention.wv.kernel": ("self_attn.v_proj.weight", 1),
    "attention.wo.kernel": ("self_attn.o_proj.weight", 2),  # [H, D, E] <- [E, H*D]
    "attention_norm.scale": ("input_layernorm.weight", None),
    "mlp.w_gate.kernel": ("mlp.gate_proj.weight", 1),  # [E, F] <- [F, E]
    "mlp.w_up.kernel": ("mlp.up_proj.weight", 1),
    "mlp.w_down.kernel": ("mlp.down_proj.weight", 1),  # [F, E] <- [E, F]
    "mlp_norm.scale": ("post_attention_layernorm.weight", None),
}
OUTER_TENSORS = {
    "embed.embedding": ("model.embed_tokens.weight", None),  # [V, E] both sides
    "final_norm.scale": ("model.norm.weight", None),
    "lm_head.kernel": ("lm_head.weight", 1),  # [E, V] <- [V, E]
}
# Buffers some older checkpoints carry; recomputed from the config, never needed.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# -- config ----------------------------------------------------------------------------------------

def config_from_hf(hf: dict, *, scan_layers: bool = True, param_dtype: str = "float32", where: str = CONFIG_FILE) -> TransformerConfig:
    """A TransformerConfig from the dict of an HF config.json; ValueError (one line, naming
    `where`) for anything lmjax's Llama cannot reproduce exactly."""
    def refuse(what):
        raise ValueError(f"{where}: {what} is not supported; lmjax imports {SUPPORTED} with plain RoPE and no biases.")

    architectures = hf.get("architectures") or [ARCHITECTURE]
    if hf.get("model_type") != "llama" or list(architectures) != [ARCHITECTURE]:
        refuse(f"model_type {hf.get('model_type')!r} / architectures {architectures}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}; it is not a complete Llama config.")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {hf['hidden_act']!r}")
    for bias in ("attention_bias", "mlp_bias"):
        if hf.get(bias):
            refuse(f"{bias}=true")
    if hf.get("rope_scaling"):
        refuse(f"rope_scaling {hf['rope_scaling']}")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps rope_theta in here
    if rope.get("rope_type", "default") != "default":
        refuse(f"rope_parameters {rope}")
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if dim % heads or heads % kv_heads:
        refuse(f"hidden_size {dim} with {heads} heads and {kv_heads} kv heads")
    if hf.get("head_dim") not in (None, dim // heads):
        refuse(f"head_dim {hf['head_dim']} (lmjax's is hidden_size / num_attention_heads = {dim // heads})")
    return TransformerConfig(
        vocab_size=int(hf["vocab_size"]), dim=dim, n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=kv_heads, mlp_hidden=int(hf["intermediate_size"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # LlamaConfig's default
        rope_base=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        scan_layers=scan_layers, param_dtype=param_dtype,
    )


def hf_config(cfg: TransformerConfig, tokenizer=None, *, max_position_embeddings: int = 2048) -> dict:
    """config.json for `cfg` as a LlamaForCausalLM; bos/eos ids from the tokenizer when it has them."""
    if cfg.prefix_lm:
        raise ValueError("A prefix-LM model (model.prefix_lm) has no Hugging Face Llama equivalent; it cannot be exported.")
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim // cfg.n_heads, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": max_position_embeddings,
        "bos_token_id": _special_id(tokenizer, "bos"), "eos_token_id": _special_id(tokenizer, "eos"),
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
    }


def _special_id(tokenizer, which: str):
    for name in (f"{which}_id", f"{which}_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


# -- the mapping -------------------------------------------------------------------------------------

def expected_params(cfg: TransformerConfig):
    """The parameter tree lmjax builds for `cfg`, as ShapeDtypeStructs (nothing is allocated)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), tokens)["params"])


def _hf_name_of(name: str):
    """lmjax flat name -> (HF name, or a template with {i} for scanned layers, input axes)."""
    if name in OUTER_TENSORS:
        return OUTER_TENSORS[name]
    head, rest = name.split(".", 1)
    if rest not in BLOCK_TENSORS:
        raise KeyError(name)
    hf_name, in_axes = BLOCK_TENSORS[rest]
    index = "{i}" if head == "layers" else head.removeprefix("layer_")
    return f"model.layers.{index}.{hf_name}", in_axes


def _hf_shape(shape, in_axes):
    """The HF shape of an lmjax kernel shape (one layer's)."""
    if in_axes is None:
        return tuple(shape)
    return (math.prod(shape[in_axes:]), math.prod(shape[:in_axes]))


def to_lmjax_layout(weight, shape, in_axes):
    return (weight if in_axes is None else weight.T).reshape(shape)


def to_hf_layout(kernel, in_axes):
    if in_axes is None:
        return kernel
    return kernel.reshape(math.prod(kernel.shape[:in_axes]), -1).T


def params_from_hf_tensors(cfg: TransformerConfig, get: Callable[[str], np.ndarray], names, *, where: str = "the checkpoint"):
    """lmjax parameters (host arrays in cfg.param_dtype, shaped like Transformer(cfg).init's)
    from HF-named tensors: `get(name)` returns one as an array, `names` are all there are.
    Missing, misshapen or unexpected tensors are a ValueError naming them."""
    names = set(names)
    dtype = jnp.dtype(cfg.param_dtype)
    used = set()

    def fetch(hf_name, shape, in_axes):
        if hf_name not in names:
            hint = " (an untied model needs lm_head.weight)" if hf_name == "lm_head.weight" else ""
            raise ValueError(f"{where} has no tensor {hf_name}{hint}.")
        weight = get(hf_name)
        want = _hf_shape(shape, in_axes)
        if tuple(weight.shape) != want:
            raise ValueError(f"Tensor {hf_name} in {where} is {list(weight.shape)}, but the config asks for {list(want)}.")
        used.add(hf_name)
        return np.asarray(to_lmjax_layout(weight, shape, in_axes), dtype=dtype)

    expected = expected_params(cfg)
    leaves = []
    for name, spec in flat_params(expected).items():
        hf_name, in_axes = _hf_name_of(name)
        if "{i}" in hf_name:  # scanned: stack the layers on a leading axis
            leaves.append(np.stack([fetch(hf_name.format(i=i), spec.shape[1:], in_axes) for i in range(cfg.n_layers)]))
        else:
            leaves.append(fetch(hf_name, spec.shape, in_axes))
    ignored = {n for n in names if n.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    unexpected = sorted(names - used - ignored)
    if unexpected:
        raise ValueError(
            f"{where} has tensor(s) lmjax's Llama has no place for: {', '.join(unexpected[:4])}"
            f"{' ...' if len(unexpected) > 4 else ''} (biases? extra modules?)."
        )
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(expected), leaves)


def hf_tensors(cfg: TransformerConfig, params) -> dict:
    """HF name -> float32 host array in HF layout, for the parameters of Transformer(cfg)."""
    out = {}
    for name, leaf in flat_params(jax.device_get(params)).items():
        hf_name, in_axes = _hf_name_of(name)
        leaf = np.asarray(leaf, dtype=np.float32)
        layers = [(hf_name.format(i=i), leaf[i]) for i in range(cfg.n_layers)] if "{i}" in hf_name else [(hf_name, leaf)]
        for n, array in layers:
            out[n] = np.ascontiguousarray(to_hf_layout(array, in_axes))
    return out


# -- folders ---------------------------------------------------------------------------------------

def read_hf_config(folder) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{str(folder)!r} has no {CONFIG_FILE}; give a Hugging Face model folder.")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}).") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object.")
    return hf


def weight_files(folder) -> dict:
    """HF tensor name -> the safetensors file holding it (one file, or shards by the index)."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{str(folder / INDEX_FILE)!r} is not a safetensors index ({error!r}).") from None
        files = {name: folder / file for name, file in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise ValueError(f"{str(folder)!r} misses shard(s) {', '.join(absent)} named in {INDEX_FILE}.")
        return files
    if (folder / MODEL_FILE).is_file():
        from safetensors import safe_open

        with safe_open(folder / MODEL_FILE, framework="flax") as f:
            return {name: folder / MODEL_FILE for name in f.keys()}
    raise ValueError(
        f"{str(folder)!r} has no {MODEL_FILE} or {INDEX_FILE}; lmjax reads safetensors weights only "
        f"(re-save a .bin checkpoint with save_pretrained(..., safe_serialization=True))."
    )


def load_hf_folder(folder, *, scan_layers: bool = True, param_dtype: str = "float32"):
    """(TransformerConfig, params) of a Hugging Face Llama folder; params on the default device,
    in `param_dtype`, laid out for `scan_layers`."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg = config_from_hf(read_hf_config(folder), scan_layers=scan_layers, param_dtype=param_dtype,
                         where=str(folder / CONFIG_FILE))
    files = weight_files(folder)
    with ExitStack() as stack:
        handles = {}

        def get(name):
            path = files[name]
            if path not in handles:  # framework="flax": safetensors' numpy reader has no bfloat16
                handles[path] = stack.enter_context(safe_open(path, framework="flax"))
            return np.asarray(handles[path].get_tensor(name))

        params = params_from_hf_tensors(cfg, get, files, where=str(folder))
    return cfg, jax.device_put(params)


def check_output_dir(out_dir, overwrite: bool):
    consolidated.check_output_dir(out_dir, overwrite, files=(CONFIG_FILE, MODEL_FILE, INDEX_FILE))


def save_hf_folder(out_dir, model_cfg, params, tokenizer=None, *, overwrite: bool = False, max_position_embeddings: int = 2048) -> Path:
    """Write `out_dir` as a Hugging Face LlamaForCausalLM folder (float32 weights); return it.

    `model_cfg`: a TransformerConfig or a dict of its fields. `tokenizer`: its files are written
    too when it has `save_hf_files(out_dir)`, and its bos/eos ids go into config.json."""
    if isinstance(model_cfg, dict):
        model_cfg = TransformerConfig(**model_cfg)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    config = hf_config(model_cfg, tokenizer, max_position_embeddings=max_position_embeddings)
    tensors = hf_tensors(model_cfg, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and hasattr(tokenizer, "save_hf_files"):
        tokenizer.save_hf_files(out_dir)
    _remove_stale_shards(out_dir)
    from safetensors.numpy import save_file

    # Temporary names, then renames, config.json last: a folder with a config.json is whole.
    tmp_model, tmp_config = out_dir / f".{MODEL_FILE}.tmp", out_dir / f".{CONFIG_FILE}.tmp"
    save_file(tensors, tmp_model, metadata={"format": "pt"})  # transformers wants format=pt
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    os.chmod(tmp_model, tmp_config.stat().st_mode & 0o777)  # safetensors creates 0600; use the umask's mode
    os.replace(tmp_model, out_dir / MODEL_FILE)
    os.replace(tmp_config, out_dir / CONFIG_FILE)
    return out_dir


def _remove_stale_shards(out_dir: Path):
    """An overwritten sharded export: its index and shards would shadow the new single file."""
    index = out_dir / INDEX_FILE
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        shards = set()
    index.unlink()
    for shard in shards:
        if "/" not in shard and (out_dir / shard).is_file():
            (out_dir / shard).unlink()


def export_run_hf(workdir, out, step=None, overwrite: bool = False) -> Path:
    """Export checkpoint `step` (default: the newest intact one) of the transformer run in
    `workdir` as a Hugging Face Llama folder `out`, with the run's tokenizer files when its
    tokenizer can write them; return `out`."""
    check_output_dir(out, overwrite)  # before the restore, so a refusal costs nothing
    from lmjax.run_dir import read_run_config, restore_params, run_tokenizer

    config = read_run_config(workdir)
    if config.implementation.model != "transformer":
        raise ValueError(
            f"{str(workdir)!r} is a {config.implementation.model} run; the Hugging Face export writes transformers only "
            f"(use --format consolidated)."
        )
    if config.model.prefix_lm:
        raise ValueError(f"{str(workdir)!r} trained a prefix-LM model, which has no Hugging Face Llama equivalent; use --format consolidated.")
    config, model, params, step = restore_params(workdir, step)
    tokenizer = run_tokenizer(config, workdir)
    return save_hf_folder(out, model.cfg, params, tokenizer, overwrite=overwrite, max_position_embeddings=config.train.seq_len)
