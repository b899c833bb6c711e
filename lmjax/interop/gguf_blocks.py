"""A GGUF file's Q4_0 / Q4_1 / Q8_0 tensors loaded straight into lmjax's quantized layout.

llama.cpp stores these types in blocks of 32 consecutive inputs of one output row, each block
with an f16 scale d (and for Q4_1 an f16 minimum m): Q8_0 holds w = d * c (c int8), Q4_0
w = d * (c - 8) and Q4_1 w = d * c + m (c in 0..15). That is lmjax.quant's grouped layout with
groups of 32 along the last contracting axis (`QuantizedArray`: w = q * scale + offset), so the
codes are taken as they are, never dequantized and re-rounded: Q8_0 -> int8 codes with one scale
a group, Q4_0 -> int4 codes q = c - 8, Q4_1 -> int4 codes q = c - 8 with offset m + 8 d. The
model then decodes with exactly the numbers the file's publisher chose, in a fraction of the f32
memory. Tensors of other types (F32/F16 norms, K-quants) are dequantized to float as before.
"""
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.interop.gguf import config_from_gguf, dequantized, hf_rows, open_gguf, tensors_by_hf_name
from lmjax.interop.hf import _hf_name_of, _hf_shape, expected_params, flat_params, to_lmjax_layout
from lmjax.quant.qarray import QuantizedArray

BLOCK = 32
# type name -> bytes of one block of 32 values
BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16}


def _f16(block_bytes):
    return block_bytes.copy().view(np.float16)[..., 0].astype(np.float32)


def blocks_of(tensor):
    """(codes [rows, cols] int8, scale [rows, cols/32], offset [rows, cols/32] or None) of a
    Q8_0 / Q4_0 / Q4_1 tensor in numpy (row-major) order, with w = codes * scale (+ offset)."""
    kind = tensor.tensor_type.name
    rows, cols = (int(n) for n in reversed(tensor.shape))
    data = np.asarray(tensor.data, np.uint8).reshape(rows, cols // BLOCK, BLOCK_BYTES[kind])
    d = _f16(data[..., 0:2])
    if kind == "Q8_0":
        return data[..., 2:].copy().view(np.int8).reshape(rows, cols), d, None
    nibbles = data[..., 4:] if kind == "Q4_1" else data[..., 2:]  # 16 bytes: value j low nibble, j+16 high
    codes = (np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int8) - 8).reshape(rows, cols)
    if kind == "Q4_0":
        return codes, d, None
    return codes, d, _f16(data[..., 2:4]) + 8 * d


def _lmjax_quantized(codes, scale, offset, shape, in_axes, bits):
    """HF-layout [out, in] codes and [out, in/32] scales -> a QuantizedArray of lmjax's kernel
    `shape` (or of the [vocab, embed] embedding when in_axes is None), groups along the last
    contracting axis."""
    # the embedding keeps [vocab, embed], its groups along embed; a kernel's run along its last input axis
    last_in = len(shape) - 1 if in_axes is None else in_axes - 1
    group_shape = (*shape[:last_in], shape[last_in] // BLOCK, *shape[last_in + 1:])
    q = to_lmjax_layout(codes, shape, in_axes)
    s, o = (None if x is None else jnp.asarray(to_lmjax_layout(x, group_shape, in_axes)) for x in (scale, offset))
    return QuantizedArray(jnp.asarray(q).astype(jnp.int8 if bits == 8 else jnp.int4), s, o)


def _stack(layers):
    """One array for a scanned model's layers; layers stored in different types (some quantized,
    some not, or with other bits or offsets) are dequantized to float to share one layout."""
    structures = {(type(x), getattr(x, "bits", None), getattr(x, "offset", 0) is None) for x in layers}
    if len(structures) > 1:
        layers = [np.asarray(x.dequantize()) if isinstance(x, QuantizedArray) else x for x in layers]
    if isinstance(layers[0], QuantizedArray):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return np.stack(layers)


def load_gguf_blocks(path, *, scan_layers: bool = True):
    """(TransformerConfig, params) of a llama GGUF file, with its Q8_0 / Q4_0 / Q4_1 tensors as
    `QuantizedArray`s (codes and scales as stored) and all other tensors as float32."""
    reader = open_gguf(path)
    where = str(path)
    cfg = config_from_gguf(reader, scan_layers=scan_layers, where=where)
    by_hf_name = tensors_by_hf_name(reader, where)

    def fetch(name, shape, in_axes):
        if name not in by_hf_name:
            raise ValueError(f"{where} has no tensor {name}.")
        tensor = by_hf_name[name]
        kind = tensor.tensor_type.name
        want = _hf_shape(shape, in_axes)
        if tuple(int(n) for n in reversed(tensor.shape)) != want:
            raise ValueError(f"Tensor {name} in {where} is {list(reversed(tensor.shape))}, but the config asks for {list(want)}.")
        if kind in BLOCK_BYTES and want[-1] % BLOCK == 0 and (in_axes is None or shape[in_axes - 1] % BLOCK == 0):
            codes, scale, offset = (None if x is None else hf_rows(name, x, cfg) for x in blocks_of(tensor))
            return _lmjax_quantized(codes, scale, offset, shape, in_axes, 8 if kind == "Q8_0" else 4)
        return np.asarray(to_lmjax_layout(hf_rows(name, dequantized(tensor), cfg), shape, in_axes), np.float32)

    expected = expected_params(cfg)
    leaves = []
    for name, spec in flat_params(expected).items():
        template, in_axes = _hf_name_of(name)
        if "{i}" in template:  # scanned: the layers stacked on a leading axis
            leaves.append(_stack([fetch(template.format(i=i), spec.shape[1:], in_axes) for i in range(cfg.n_layers)]))
        else:
            leaves.append(fetch(template, spec.shape, in_axes))
    return cfg, jax.device_put(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(expected), leaves))
