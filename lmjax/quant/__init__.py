"""Weight-only quantization (int8 per output channel, int4 in groups; round-to-nearest or GPTQ)
of any lmjax parameter tree, with matmuls that dequantize on the fly inside the jitted model.

A quantized tree has the float tree's structure with `QuantizedArray` leaves (codes, scales,
offsets) where kernels and the embedding were; `Projection` and `Embedding` dequantize them, so
the unchanged model, Decoder, Generator and evaluator run it. Codes keep the kernel's shape and
logical axes; scales keep its rank (contracting axes 1 or grouped), so the mesh rules shard them
like the kernel's output (and grouped input) axes (`quantize.param_shardings`).

Why not qwix or AQT: qwix 0.1.8 fits linen by intercepting dot_general, but its PTQ stores each
weight in the shape its matmul sees (`WithAux.reshape` refuses otherwise): lmjax's N-D kernels
(embed, heads, kv), flattened in Projection, would lose their logical axes and mesh rules, and a
tied embedding (a `take` and an einsum) is outside its interception. AQT (aqtp) is superseded by
qwix and needs a dot_general injected into every module. lmjax has one seam (Projection), so a
pytree and a dequantize there is the smaller, exact change.

Calibrated method: GPTQ (activations' Gram matrices, collected through the `quant_stats`
collection); its output is plain codes/scales, so inference is unchanged; AWQ's per-input
scales would need folding into norms that wo/w_down do not have; HQQ ignores activations.
"""
from lmjax.quant.qarray import QuantizedArray, is_quantized  # noqa: F401
