"""FLOPs of a train step: counted by XLA from the compiled program, and by hand from the shapes.

The compiled count (`compiled_flops`) is what the machine is asked to do: every matmul, every
elementwise op of the loss, the norms, the softmax and the optimizer, on padding tokens too.
The analytic count (`transformer_train_flops`) is the usual matmul-only estimate: 2 FLOPs per
multiply-add, backward = 2 x forward. Causal attention is **not** halved: the XLA attention
computes every score it is given and masks afterwards, so what runs is the full L x L square,
or with block skipping (`model.attention_block`) the blocks' key ranges, which are counted.
The two agree to a few percent once the matmuls dominate (tests/test_flops.py states the bound).

XLA's cost analysis counts the body of a while loop once, whatever its trip count, so a program
whose layers run under `nn.scan` (or whose micro-batches run under `lax.scan`) would be
undercounted; `train_step_flops` therefore counts a copy of the step with the layers unrolled
and one micro-batch, scaled by the number of micro-batches.
"""
import math

import jax


def compiled_flops(compiled) -> float:
    """FLOPs XLA reports for a compiled (`jit(f).lower(...).compile()`) program; NaN if none."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", math.nan))


def transformer_forward_flops_per_token(cfg, seq_len: int, max_segment_len: int = 0) -> float:
    """Matmul FLOPs of one token's forward pass through a `TransformerConfig` model, with rows of
    `seq_len` tokens (each query scores all `seq_len` keys, the unhalved causal square, or with
    block skipping the keys of its block's range)."""
    from lmjax.models.attention import scored_keys_per_query

    head_dim = cfg.dim // cfg.n_heads
    q_and_out = 2 * 2 * cfg.dim * cfg.n_heads * head_dim
    k_and_v = 2 * 2 * cfg.dim * cfg.n_kv_heads * head_dim
    keys = scored_keys_per_query(seq_len, getattr(cfg, "attention_block", 0), max_segment_len, cfg.prefix_lm)
    scores_and_mix = 2 * 2 * keys * cfg.n_heads * head_dim
    mlp = 2 * 3 * cfg.dim * cfg.mlp_hidden
    head = 2 * cfg.dim * cfg.vocab_size  # the embedding lookup is a gather: no FLOPs
    return cfg.n_layers * (q_and_out + k_and_v + scores_and_mix + mlp) + head


def transformer_train_flops(cfg, batch_size: int, seq_len: int, max_segment_len: int = 0) -> float:
    """Analytic matmul FLOPs of one optimizer step (forward + backward = 3 x forward)."""
    return 3 * batch_size * seq_len * transformer_forward_flops_per_token(cfg, seq_len, max_segment_len)


def matmul_params_train_flops(params, batch_size: int, seq_len: int) -> float:
    """The 6 N D rule for models without a shape formula here (Mamba, RNNs): 6 FLOPs per
    parameter per token, counting the embedding table as a lookup (no FLOPs). Leaves out the
    scans themselves, so it is a lower bound."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    n = sum(leaf.size for path, leaf in leaves if "embed" not in jax.tree_util.keystr(path))
    return 6 * n * batch_size * seq_len


def analytic_train_flops(model, params, batch_size: int, seq_len: int, max_segment_len: int = 0) -> tuple[float, str]:
    """(FLOPs, how they were counted) for one step of `model` (a Transformer, Mamba or RNN)."""
    cfg = model.cfg
    if hasattr(cfg, "n_kv_heads"):
        how = "matmuls, causal attention not halved"
        if getattr(cfg, "attention_block", 0):
            how += f", keys of the attention blocks' ranges (block {cfg.attention_block}, longest sequence {max_segment_len or 'unknown'})"
        return transformer_train_flops(cfg, batch_size, seq_len, max_segment_len), how
    return matmul_params_train_flops(params, batch_size, seq_len), "6 x non-embedding params x tokens (scans left out)"


def unrolled_copy(model):
    """`model` with its layers unrolled, for counting (XLA counts a loop body once)."""
    import dataclasses

    if getattr(model.cfg, "scan_layers", False):
        return model.clone(cfg=dataclasses.replace(model.cfg, scan_layers=False))
    return model
