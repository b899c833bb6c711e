"""`QuantizedArray`: integer codes with float scales (and offsets), a pytree that stands in for
a float parameter and dequantizes inside the jitted program that reads it.

Kept free of any lmjax import: lmjax.models.layers imports it, lmjax.quant.quantize imports the
models."""
import flax.struct
import jax
import jax.numpy as jnp


def _split_shapes(q_shape, s_shape):
    """Shapes that make `scale` broadcast over the codes: a dimension of size n with s scales
    becomes (s, n // s) for the codes and (s, 1) for the scales (s = 1 or n stay one dimension)."""
    q_split, s_split = [], []
    for n, s in zip(q_shape, s_shape):
        if s in (1, n):
            q_split.append(n)
            s_split.append(s)
        else:
            if n % s:
                raise ValueError(f"{s} scales do not divide a dimension of {n}.")
            q_split += [s, n // s]
            s_split += [s, 1]
    return tuple(q_split), tuple(s_split)


@flax.struct.dataclass
class QuantizedArray:
    """w ≈ q * scale (+ offset), with `scale`/`offset` of the codes' rank, each dimension either
    the codes' size (one scale per index: an output channel, a layer), 1 (shared: per output
    channel over the contracting axes) or a divisor of it (groups of consecutive entries).

    `q` comes first and keeps the float parameter's shape: flax's `param()` compares the first
    leaf's shape with the float initializer's, so a quantized tree applies to the unchanged model.
    """

    q: jax.Array  # int8 (symmetric, -127..127) or int4 codes, the float array's shape
    scale: jax.Array  # float32
    offset: jax.Array | None = None  # asymmetric codes: w = q * scale + offset

    @property
    def shape(self):
        return self.q.shape

    @property
    def ndim(self):
        return self.q.ndim

    @property
    def bits(self) -> int:
        return jnp.iinfo(self.q.dtype).bits

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes (two int4 per byte, as XLA stores them on GPU/TPU), scales and offsets."""
        extra = sum(x.size * x.dtype.itemsize for x in (self.scale, self.offset) if x is not None)
        return self.q.size * self.bits // 8 + extra

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        q_split, s_split = _split_shapes(self.q.shape, self.scale.shape)
        w = self.q.reshape(q_split).astype(dtype) * self.scale.reshape(s_split).astype(dtype)
        if self.offset is not None:
            w = w + self.offset.reshape(s_split).astype(dtype)
        return w.reshape(self.q.shape)

    def take_rows(self, ids) -> "QuantizedArray":
        """Rows `ids` of the leading axis (an embedding lookup), still quantized: the leading
        axis must have one scale per row."""
        if self.scale.shape[0] != self.q.shape[0]:
            raise ValueError("take_rows needs one scale per row of the leading axis.")
        pick = lambda x: None if x is None else jnp.take(x, ids, axis=0)
        return QuantizedArray(pick(self.q), pick(self.scale), pick(self.offset))


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)
