"""Real Llama-family weights by path: a `.gguf` file (lmjax.interop.gguf) or a Hugging Face
folder (lmjax.interop.hf), with their tokenizer (lmjax.data.tokenizers)."""
import dataclasses
from pathlib import Path
from typing import Any

from lmjax.models.transformer import TransformerConfig

EXPECTED = "a .gguf file or a Hugging Face Llama folder (config.json + model.safetensors)"
# The fields of TransformerConfig the weights decide; the rest (scan_layers, dtypes, remat, ...)
# are the run's choice.
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "tie_embeddings", "rope_base", "norm_eps")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    config: TransformerConfig
    params: Any  # the parameter tree of Transformer(config), on the default device
    tokenizer: Any
    source: str  # the path the weights came from


def _kind(path) -> str:
    """'gguf' or 'hf'; ValueError naming what was expected otherwise."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    raise ValueError(f"{str(path)!r} is not {EXPECTED}.")


def is_pretrained_path(path) -> bool:
    """Whether `path` looks like weights load_pretrained reads (by its form; nothing is parsed)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    return (path / "config.json").is_file() and any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))


def read_config(path, *, scan_layers: bool = True, param_dtype: str = "float32") -> TransformerConfig:
    """The TransformerConfig of the weights at `path`, from config.json or the GGUF metadata
    alone (no tensor is read)."""
    if _kind(path) == "gguf":
        from lmjax.interop.gguf import config_from_gguf, open_gguf

        return config_from_gguf(open_gguf(path), scan_layers=scan_layers, param_dtype=param_dtype, where=str(path))
    from lmjax.interop.hf import CONFIG_FILE, config_from_hf, read_hf_config

    return config_from_hf(read_hf_config(path), scan_layers=scan_layers, param_dtype=param_dtype,
                          where=str(Path(path) / CONFIG_FILE))


def read_shape(path) -> dict:
    """The model-section keys the weights at `path` fix (SHAPE_FIELDS), cheaply."""
    cfg = read_config(path)
    return {name: getattr(cfg, name) for name in SHAPE_FIELDS}


def load_weights(path, *, scan_layers: bool = True, param_dtype: str = "float32"):
    """(TransformerConfig, params) of a GGUF file or a Hugging Face Llama folder."""
    if _kind(path) == "gguf":
        from lmjax.interop.gguf import load_gguf as load
    else:
        from lmjax.interop.hf import load_hf_folder as load
    return load(path, scan_layers=scan_layers, param_dtype=param_dtype)


def load_pretrained(path, *, scan_layers: bool = True, param_dtype: str = "float32", gguf_blocks: bool = False) -> Pretrained:
    """Weights, config and tokenizer of a GGUF file or a Hugging Face Llama folder.
    `gguf_blocks`: keep a GGUF's Q8_0 / Q4_0 / Q4_1 tensors as int8 / int4 QuantizedArrays, codes
    and scales as stored (lmjax.interop.gguf_blocks), instead of dequantizing them to float."""
    if gguf_blocks:
        if _kind(path) != "gguf":
            raise ValueError(f"{str(path)!r} is not a GGUF file: only a GGUF's quantized blocks can be kept as they are.")
        from lmjax.interop.gguf_blocks import load_gguf_blocks

        config, params = load_gguf_blocks(path, scan_layers=scan_layers)
    else:
        config, params = load_weights(path, scan_layers=scan_layers, param_dtype=param_dtype)
    from lmjax.data.tokenizers import pretrained_tokenizer

    return Pretrained(config, params, pretrained_tokenizer(path), str(path))
