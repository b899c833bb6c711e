"""Consolidated export: a run's parameters as one safetensors file of full arrays + params.json.

    DIR/model.safetensors   one tensor per parameter, named by its path joined with '.'
                            (`embed.embedding`, `layers.attention.wq.kernel` [layers, ...] when
                            the layers are scanned, `layer_0.mlp.w_up.kernel` when unrolled)
    DIR/params.json         format version, implementation.model, the model config, the
                            checkpoint step, the source workdir, data/tokenizer, the run config

`load_consolidated(DIR)` rebuilds the model and its parameters on any machine, no mesh, no
optimizer state, no dataset.
"""
import dataclasses
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from lmjax.models.transformer import Transformer, TransformerConfig

FORMAT = "lmjax.consolidated"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
PARAMS_FILE = "params.json"

# implementation.model -> (module class, its config dataclass); what load_consolidated can rebuild.
MODEL_CLASSES = {"transformer": (Transformer, TransformerConfig)}
# data.name -> the tokenizer its runs use.
DATASET_TOKENIZERS = {"facts": "bytes", "shakespeare": "chars"}


def tensor_name(path) -> str:
    """('layers', 'attention', 'wq', 'kernel') tree path -> 'layers.attention.wq.kernel'."""
    keys = [str(getattr(k, "key", k)) for k in path]
    if any("." in key for key in keys):
        raise ValueError(f"Parameter path {keys} has a '.' in a name; it cannot be joined into a tensor name.")
    return ".".join(keys)


def flat_params(params) -> dict:
    """Tensor name -> leaf, in tree-flatten order."""
    return {tensor_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def host_tensors(params) -> dict:
    """Tensor name -> full host numpy array (a sharded array is gathered from its devices)."""
    return {name: np.ascontiguousarray(leaf) for name, leaf in flat_params(jax.device_get(params)).items()}


def save_consolidated(out_dir, model_cfg: dict, params, meta: dict, *, overwrite: bool = False) -> Path:
    """Write `out_dir/model.safetensors` and `out_dir/params.json`; return `out_dir`.

    `model_cfg`: the model config as a dict (for a transformer, TransformerConfig's fields).
    `meta`: the rest of params.json; must hold `implementation.model`.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    model_name = meta.get("implementation", {}).get("model")
    if model_name not in MODEL_CLASSES:
        raise ValueError(f"Cannot export implementation.model {model_name!r}; choose one of: {', '.join(MODEL_CLASSES)}.")
    tensors = host_tensors(params)
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, **meta, "model": dict(model_cfg),
        "num_parameters": int(sum(t.size for t in tensors.values())),
        "tensors": {name: {"shape": list(t.shape), "dtype": t.dtype.name} for name, t in tensors.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written under temporary names, then renamed: an interrupted export never leaves a torn file.
    tmp_model, tmp_json = out_dir / f".{MODEL_FILE}.tmp", out_dir / f".{PARAMS_FILE}.tmp"
    tmp_json.write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
    save_file(tensors, tmp_model, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    os.chmod(tmp_model, tmp_json.stat().st_mode & 0o777)  # safetensors creates 0600; use the umask's mode
    os.replace(tmp_model, out_dir / MODEL_FILE)
    os.replace(tmp_json, out_dir / PARAMS_FILE)
    return out_dir


def check_output_dir(out_dir, overwrite: bool, files=(MODEL_FILE,)):
    """ValueError if `out_dir` is a file, or already holds one of an export's `files` and
    `overwrite` is off."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{str(out_dir)!r} is a file; give --out a folder.")
    taken = [name for name in files if (out_dir / name).exists()]
    if taken and not overwrite:
        raise ValueError(f"{str(out_dir / taken[0])!r} already exists; pass --overwrite to replace it, or pick another --out.")


def tokenizer_info(config) -> dict:
    kind = DATASET_TOKENIZERS.get(config.data.name, "unknown")
    info = {"kind": kind}
    if kind == "bytes":
        from lmjax.data.tokenizers.byte import SPECIAL_TOKENS

        info["special_tokens"] = dict(SPECIAL_TOKENS)
    return info


def export_run(workdir, out_dir, step=None, *, overwrite: bool = False) -> Path:
    """Export checkpoint `step` (default: the newest intact one; a damaged `step` is a ValueError) of
    the run in `workdir` to `out_dir`; return `out_dir`."""
    check_output_dir(out_dir, overwrite)  # before the restore, so a refusal costs nothing
    from lmjax.config import to_json
    from lmjax.run_dir import restore_params

    config, model, params, step = restore_params(workdir, step)
    meta = {
        "implementation": {"model": config.implementation.model},
        "step": int(step),
        "source_workdir": str(Path(workdir).resolve()),
        "data": {"name": config.data.name},
        "tokenizer": tokenizer_info(config),
        "run_config": json.loads(to_json(config)),
    }
    return save_consolidated(out_dir, dataclasses.asdict(model.cfg), params, meta, overwrite=overwrite)


def read_params_json(directory) -> dict:
    path = Path(directory) / PARAMS_FILE
    if not path.is_file():
        raise ValueError(f"{str(Path(directory))!r} has no {PARAMS_FILE}; export a run first (python -m lmjax.export).")
    try:
        header = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}).") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an lmjax consolidated export (no \"format\": \"{FORMAT}\").")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format_version {header.get('format_version')!r}; "
            f"this lmjax reads version {FORMAT_VERSION}."
        )
    return header


def build_from_header(header):
    model_name = header.get("implementation", {}).get("model")
    if model_name not in MODEL_CLASSES:
        raise ValueError(f"Unknown implementation.model {model_name!r} in params.json; choose one of: {', '.join(MODEL_CLASSES)}.")
    module, cfg_class = MODEL_CLASSES[model_name]
    cfg = dict(header.get("model", {}))
    known = {f.name for f in dataclasses.fields(cfg_class)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"params.json has model field(s) {', '.join(unknown)} that this lmjax's {cfg_class.__name__} does not know.")
    try:
        return module(cfg_class(**cfg))
    except TypeError as error:  # a required field is missing
        raise ValueError(f"params.json's model config is incomplete: {error}.") from None


def load_consolidated(directory):
    """(model, params) from an export folder: params is a nested dict of host numpy arrays shaped
    exactly like `nn.meta.unbox(model.init(...)["params"])`; place them with jax.device_put."""
    directory = Path(directory)
    header = read_params_json(directory)
    model = build_from_header(header)
    if not (directory / MODEL_FILE).is_file():
        raise ValueError(f"{str(directory)!r} has params.json but no {MODEL_FILE}.")
    tensors = load_file(directory / MODEL_FILE)
    expected = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
    names = flat_params(expected)
    missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or extra:
        raise ValueError(
            f"{MODEL_FILE} does not match the model in params.json: "
            f"missing {', '.join(missing[:5]) or 'none'}; unexpected {', '.join(extra[:5]) or 'none'}."
        )
    for name, spec in names.items():
        if tensors[name].shape != spec.shape or tensors[name].dtype != spec.dtype:
            raise ValueError(
                f"Tensor {name} is {tensors[name].dtype}{list(tensors[name].shape)} in {MODEL_FILE} "
                f"but the model in params.json wants {spec.dtype}{list(spec.shape)}."
            )
    leaves = [tensors[name] for name in names]
    return model, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(expected), leaves)
