"""Quantize a model's parameter tree: which arrays, along which axes, and how (RTN or GPTQ).

Every `Projection` kernel [*lead, *in, *out] (`lead`: the stacked `layers` axis under nn.scan)
and the token embedding [vocab, embed] become `QuantizedArray`s; norms and other small vectors
stay float. The contracting axes of a kernel are its `in` axes; the embedding contracts `embed`
when it serves as the tied output head, so its scales go per vocabulary row.

- per channel (`group_size=None`): one scale per output channel (over all contracting axes)
- groups (`group_size=g`): one scale (and offset) per g consecutive entries of the last
  contracting axis, per output channel; g must divide that axis.
"""
import dataclasses
import math

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.quant.qarray import QuantizedArray


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    bits: int = 8  # 8 or 4
    group_size: int | None = None  # None: per output channel
    symmetric: bool | None = None  # default: symmetric for 8 bits, asymmetric (min/max, offset) for 4
    method: str = "rtn"  # "rtn" or "gptq" (needs calibration tokens)
    quantize_embedding: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits}; choose 8 or 4.")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"Unknown quantization method {self.method!r}; choose one of: gptq, rtn.")

    @property
    def is_symmetric(self) -> bool:
        return self.bits == 8 if self.symmetric is None else self.symmetric

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """'int8', 'int4', 'int4-g32', 'int4-g64-gptq', 'int8-gptq'."""
        parts = text.lower().split("-")
        if parts[0] not in ("int8", "int4"):
            raise ValueError(f"Unknown quantization {text!r}; write int8 or int4, then optionally -g<group> and -gptq (e.g. int4-g64-gptq).")
        bits, group, method = int(parts[0][3:]), None, "rtn"
        for part in parts[1:]:
            if part.startswith("g") and part[1:].isdigit():
                group = int(part[1:])
            elif part in ("rtn", "gptq"):
                method = part
            else:
                raise ValueError(f"Unknown part {part!r} of quantization {text!r}; use -g<group> or -gptq/-rtn.")
        if bits == 4 and group is None:
            group = 64
        return cls(bits=bits, group_size=group, method=method)


# -- which arrays, which axes -------------------------------------------------------------------


def projection_layouts(model, sample_tokens_BxL=None) -> dict:
    """Parameter path of each Projection kernel -> (number of contracting axes, number of output
    axes), read off the modules by tracing the model once (nothing is computed)."""
    from lmjax.models.layers import Projection

    found = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, Projection) and context.method_name == "__call__":
            found[tuple(module.path) + ("kernel",)] = (len(module.in_shape), len(module.out_shape))
        return next_fun(*args, **kwargs)

    tokens = jnp.zeros((1, 8), jnp.int32) if sample_tokens_BxL is None else sample_tokens_BxL
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))
    return found


def _to_canonical(w, n_in, n_out):
    """[*lead, *in, *out] -> [P, I, O] (P = prod lead, I = prod in, O = prod out)."""
    lead = w.shape[: w.ndim - n_in - n_out]
    return w.reshape(math.prod(lead), math.prod(w.shape[len(lead): len(lead) + n_in]), -1)


def _scale_shape(shape, n_in, n_out, groups_per_row):
    """The N-D scale shape: lead and out axes whole; per channel: contracting axes 1; groups:
    all contracting axes whole but the last, which holds its number of groups."""
    lead = len(shape) - n_in - n_out
    in_shape = shape[lead: lead + n_in]
    if groups_per_row is None:
        mid = (1,) * n_in
    else:
        mid = tuple(in_shape[:-1]) + (groups_per_row,)
    return tuple(shape[:lead]) + mid + tuple(shape[lead + n_in:])


def _group_size(spec, shape, n_in, n_out, where):
    lead = len(shape) - n_in - n_out
    I = math.prod(shape[lead: lead + n_in])
    if spec.group_size is None:
        return I
    last = shape[lead + n_in - 1]
    if last % spec.group_size:
        raise ValueError(f"group_size={spec.group_size} does not divide the last contracting axis ({last}) of "
                         f"{'/'.join(where)} {tuple(shape)}; pick a divisor of {last}.")
    return spec.group_size


# -- round to nearest -----------------------------------------------------------------------------


def quantize_groups(w_GxN, bits, symmetric):
    """Codes, scale and offset (None if symmetric) for each row of w [..., N] as one group."""
    w = np.asarray(w_GxN, np.float32)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = np.max(np.abs(w), axis=-1, keepdims=True)
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        return np.clip(np.round(w / scale), -qmax, qmax), scale, None
    levels = 2**bits - 1
    lo, hi = np.min(w, axis=-1, keepdims=True), np.max(w, axis=-1, keepdims=True)
    scale = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float32)
    codes = np.clip(np.round((w - lo) / scale), 0, levels) - 2 ** (bits - 1)  # signed codes
    offset = (lo + 2 ** (bits - 1) * scale).astype(np.float32)
    return codes, scale, offset


def _codes_dtype(bits):
    return jnp.int8 if bits == 8 else jnp.int4


def _pack(codes_PxIxO, scale_PxGxO, offset_PxGxO, shape, n_in, n_out, groups_per_row, bits):
    s_shape = _scale_shape(shape, n_in, n_out, groups_per_row)
    q = jnp.asarray(codes_PxIxO.reshape(shape).astype(np.int8)).astype(_codes_dtype(bits))
    scale = jnp.asarray(scale_PxGxO.reshape(s_shape))
    offset = None if offset_PxGxO is None else jnp.asarray(offset_PxGxO.reshape(s_shape))
    return QuantizedArray(q, scale, offset)


def rtn_quantize(w, n_in, n_out, spec: QuantSpec, where=("array",)) -> QuantizedArray:
    """Round-to-nearest quantization of a kernel [*lead, *in, *out]."""
    w = np.asarray(w, np.float32)
    g = _group_size(spec, w.shape, n_in, n_out, where)
    P, I, O = _to_canonical(w, n_in, n_out).shape
    w_PxGxOxg = _to_canonical(w, n_in, n_out).reshape(P, I // g, g, O).transpose(0, 1, 3, 2)
    codes, scale, offset = quantize_groups(w_PxGxOxg, spec.bits, spec.is_symmetric)
    codes = codes.transpose(0, 1, 3, 2).reshape(P, I, O)
    offset = None if offset is None else offset[..., 0]
    return _pack(codes, scale[..., 0], offset, w.shape, n_in, n_out, _groups_last(w.shape, n_in, n_out, g, spec), spec.bits)


def _groups_last(shape, n_in, n_out, g, spec):
    if spec.group_size is None:
        return None
    return shape[len(shape) - n_out - 1] // g


# -- GPTQ ---------------------------------------------------------------------------------------


def gptq_quantize_matrix(w_IxO, gram_IxI, spec: QuantSpec, g: int, damp: float = 0.01, block: int = 128):
    """GPTQ (Frantar et al. 2022) of one kernel [I, O] given its inputs' Gram matrix X^T X [I, I]:
    inputs are quantized one at a time, in order, and each one's rounding error is pushed onto the
    inputs not yet quantized through the inverse Hessian, so that x @ w_q stays close to x @ w
    on the calibration inputs. Groups of g consecutive inputs share a scale, set from the
    (already corrected) weights when the group starts. Returns codes [I, O], scale and offset
    [I // g, O] (offset None if symmetric)."""
    W = np.array(w_IxO, np.float64)
    I, O = W.shape
    H = np.array(gram_IxI, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H += damp * np.mean(np.diag(H)) * np.eye(I)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper Cholesky factor of H^-1
    block = max(g, (block // g) * g) if g < I else I
    codes = np.zeros((I, O))
    scales, offsets = np.zeros((I // g, O)), np.zeros((I // g, O))
    scale_O = offset_O = None
    for i1 in range(0, I, block):
        i2 = min(i1 + block, I)
        W1, Err = W[i1:i2].copy(), np.zeros((i2 - i1, O))
        H1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if row % g == 0:  # a new group: its scale from the weights as corrected so far
                span = W1[i: i + g] if g <= i2 - i1 else W[row: row + g]
                _, s, o = quantize_groups(span.T, spec.bits, spec.is_symmetric)
                scale_O, offset_O = s[:, 0], (np.zeros(O) if o is None else o[:, 0])
                scales[row // g], offsets[row // g] = scale_O, offset_O
            w = W1[i]
            if spec.is_symmetric:
                qmax = 2 ** (spec.bits - 1) - 1
                c = np.clip(np.round(w / scale_O), -qmax, qmax)
            else:
                half = 2 ** (spec.bits - 1)
                c = np.clip(np.round((w - offset_O) / scale_O), -half, half - 1)
            codes[row] = c
            err = (w - (c * scale_O + offset_O)) / H1[i, i]
            W1[i:] -= H1[i, i:, None] * err[None, :]
            Err[i] = err
        W[i2:] -= Hinv[i1:i2, i2:].T @ Err
    return codes, scales.astype(np.float32), (None if spec.is_symmetric else offsets.astype(np.float32))


def gptq_quantize(w, gram_PxIxI, n_in, n_out, spec: QuantSpec, where=("array",)) -> QuantizedArray:
    w = np.asarray(w, np.float32)
    g = _group_size(spec, w.shape, n_in, n_out, where)
    w_PxIxO = _to_canonical(w, n_in, n_out)
    P, I, O = w_PxIxO.shape
    gram = np.asarray(gram_PxIxI, np.float64).reshape(P, I, I)
    results = [gptq_quantize_matrix(w_PxIxO[p], gram[p], spec, g) for p in range(P)]
    codes = np.stack([r[0] for r in results])
    scale = np.stack([r[1] for r in results])
    offset = None if spec.is_symmetric else np.stack([r[2] for r in results])
    return _pack(codes, scale, offset, w.shape, n_in, n_out, _groups_last(w.shape, n_in, n_out, g, spec), spec.bits)


def calibration_grams(model, params, batches) -> dict:
    """Kernel path -> the sum over `batches` (token arrays [B, L]) of each Projection's input
    Gram matrix X^T X, [*lead, I, I] (lead: the layers axis of a scanned model)."""

    @jax.jit
    def grams(params, tokens_BxL):
        _, state = model.apply({"params": params}, tokens_BxL, mutable=["quant_stats"])
        return state["quant_stats"]

    total = None
    for tokens in batches:
        stats = jax.device_get(grams(params, jnp.asarray(tokens, jnp.int32)))
        total = stats if total is None else jax.tree.map(np.add, total, stats)
    flat = flax.traverse_util.flatten_dict(total)
    # sow keeps a tuple (one value: each Projection runs once) under "input_gram", beside "kernel"
    return {path[:-1] + ("kernel",): np.asarray(value[0]) for path, value in flat.items()}



# -- whole trees ----------------------------------------------------------------------------------


def quantize_params(model, params, spec: QuantSpec | str = "int8", calibration=None):
    """The parameter tree with every Projection kernel and the embedding quantized per `spec`.

    `calibration` (GPTQ only): an iterable of token arrays [B, L] run through the float model to
    collect each kernel's input statistics. The embedding is quantized round-to-nearest always
    (a lookup table: GPTQ's input statistics do not apply to it)."""
    if isinstance(spec, str):
        spec = QuantSpec.parse(spec)
    layouts = projection_layouts(model)
    grams = None
    if spec.method == "gptq":
        if calibration is None:
            raise ValueError("GPTQ needs calibration tokens: pass calibration=[tokens_BxL, ...].")
        grams = calibration_grams(model, params, calibration)
    host = jax.device_get(params)
    flat = flax.traverse_util.flatten_dict(host)
    out = {}
    for path, w in flat.items():
        if path in layouts:
            n_in, n_out = layouts[path]
            if grams is not None and path in grams:
                out[path] = gptq_quantize(w, grams[path], n_in, n_out, spec, path)
            else:
                out[path] = rtn_quantize(w, n_in, n_out, spec, path)
        elif spec.quantize_embedding and path[-1] == "embedding" and np.ndim(w) == 2:
            # [vocab, embed] as a kernel [embed (in), vocab (out)]: scales per vocabulary row
            qa = rtn_quantize(np.asarray(w).T, 1, 1, dataclasses.replace(spec, method="rtn"), path)
            out[path] = QuantizedArray(qa.q.T, qa.scale.T, None if qa.offset is None else qa.offset.T)
        else:
            out[path] = jnp.asarray(w)
    return flax.traverse_util.unflatten_dict(out)


def dequantize_params(params, dtype=jnp.float32):
    """Float parameters equal to what the quantized matmuls compute with."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, QuantizedArray) else x, params,
                        is_leaf=lambda x: isinstance(x, QuantizedArray))


def weight_bytes(params) -> int:
    """Bytes of the weights: int4 codes counted packed (two a byte, as on GPU/TPU)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedArray))
    return sum(x.nbytes if isinstance(x, QuantizedArray) else x.size * x.dtype.itemsize for x in leaves)


# -- meshes ---------------------------------------------------------------------------------------


def param_shardings(model, params, layout, seq_len: int = 8):
    """NamedShardings for a (partly) quantized tree on `layout`'s mesh: codes, scales and offsets
    each by the float parameter's logical axes (a scale's size-1 or grouped axes are replicated
    where they do not divide the mesh axis)."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32)))["params"]
    names = {path: leaf.names for path, leaf in flax.traverse_util.flatten_dict(
        boxed, is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned)).items()
        if isinstance(leaf, nn.LogicallyPartitioned)}
    flat = flax.traverse_util.flatten_dict(params, is_leaf=lambda _, x: isinstance(x, QuantizedArray))
    out = {}
    for path, x in flat.items():
        axes = names.get(path)
        if axes is None:
            out[path] = jax.tree.map(lambda _: layout.replicated, x)
        else:
            out[path] = jax.tree.map(lambda a: layout.sharding(a.shape, axes), x)
    return flax.traverse_util.unflatten_dict(out)


def put_params(params, shardings):
    """Host (quantized) parameters onto their shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)
