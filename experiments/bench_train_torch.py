"""PyTorch reference for training throughput: HF `LlamaForCausalLM`, f32, CPU.

The lmjax side (`experiments/bench_train.py`) runs the same shapes next to this and prints the
ratio. torch and transformers are imported here only: they are an optional test extra, never an
lmjax runtime dependency.

    python experiments/bench_train_torch.py     # the issue's reference size, one line
"""

import os
import statistics
import time


def llama_train_flops_per_token(dim: int, n_layers: int, n_heads: int, n_kv_heads: int,
                                mlp_hidden: int, vocab: int, seq_len: int) -> dict:
    """Analytic train (forward + backward) FLOPs per token of a Llama decoder.

    matmul term: 6 x matmul parameters (2 FLOPs per multiply-add forward, 4 backward). Matmul
      parameters are q/k/v/o, the three SwiGLU projections and the untied LM head; the
      embedding table is a lookup, not a matmul, and norms are negligible.
    attention term: 12 * n_layers * seq_len * dim. Per token and layer the forward pass does
      q.k^T over seq_len keys (2 * seq_len * dim) and probs @ v (2 * seq_len * dim); backward is
      twice that. This counts the FULL seq_len x seq_len score matrix, not the causal half
      (which would be 6 * n_layers * seq_len * dim), because that is what dense SDPA/XLA
      attention actually computes, so it matches a compiler's cost analysis.
    """
    head_dim = dim // n_heads
    per_layer = (dim * n_heads * head_dim            # q
                 + 2 * dim * n_kv_heads * head_dim   # k, v
                 + n_heads * head_dim * dim          # o
                 + 3 * dim * mlp_hidden)             # gate, up, down
    matmul_params = n_layers * per_layer + dim * vocab  # + LM head
    matmul_flops = 6 * matmul_params
    attention_flops = 12 * n_layers * seq_len * n_heads * head_dim
    return {
        "matmul_params": matmul_params,
        "matmul_flops_per_token": matmul_flops,
        "attention_flops_per_token": attention_flops,
        "train_flops_per_token": matmul_flops + attention_flops,
    }


def build_llama(dim, n_layers, n_heads, n_kv_heads, mlp_hidden, vocab, seq_len, seed=0):
    """HF LlamaForCausalLM with exactly these shapes: untied embeddings, eps 1e-5, rope 1e4, sdpa."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=mlp_hidden,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        max_position_embeddings=seq_len, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False, mlp_bias=False, attention_dropout=0.0, use_cache=False,
        attn_implementation="sdpa", dtype=torch.float32,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"Expected sdpa attention, got {model.config._attn_implementation!r}.")
    return model


def torch_reference_tokens_per_s(dim, n_layers, n_heads, n_kv_heads, mlp_hidden, vocab, seq_len,
                                 batch, steps=10, warmup=3, seed=0) -> dict:
    """Train HF Llama on random tokens with AdamW on all CPU cores; median step over `steps`.

    Returns tokens_per_s, step_time_s (medians), the step times, parameter counts, the analytic
    train FLOPs per token (see `llama_train_flops_per_token`), achieved FLOP/s and the thread
    count. Batches are made before timing so only forward, backward and the update are timed.
    """
    import torch

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    model = build_llama(dim, n_layers, n_heads, n_kv_heads, mlp_hidden, vocab, seq_len, seed)
    model.train()

    flops = llama_train_flops_per_token(dim, n_layers, n_heads, n_kv_heads, mlp_hidden, vocab,
                                        seq_len)
    linear_params = sum(m.weight.numel() for m in model.modules()
                        if isinstance(m, torch.nn.Linear))
    if linear_params != flops["matmul_params"]:  # the analytic count must describe this model
        raise AssertionError(f"nn.Linear params {linear_params} != analytic "
                             f"{flops['matmul_params']}.")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, vocab, (batch, seq_len), generator=generator)
               for _ in range(warmup + steps)]

    step_times, losses = [], []
    for i, tokens in enumerate(batches):
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss  # HF shifts labels internally
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start  # CPU torch is synchronous: no barrier needed
        losses.append(loss.item())
        if i >= warmup:
            step_times.append(elapsed)

    step_time = statistics.median(step_times)
    tokens_per_s = batch * seq_len / step_time
    return {
        "tokens_per_s": tokens_per_s,
        "step_time_s": step_time,
        "step_times_s": step_times,
        "n_params": sum(p.numel() for p in model.parameters()),
        **flops,
        "achieved_flops_per_s": tokens_per_s * flops["train_flops_per_token"],
        "final_loss": losses[-1],
        "threads": threads,
        "torch_version": torch.__version__,
    }


REFERENCE = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden=768, vocab=128,
                 seq_len=256, batch=8)


def main():
    result = torch_reference_tokens_per_s(**REFERENCE)
    line = (f"torch HF Llama f32 cpu d={REFERENCE['dim']} layers={REFERENCE['n_layers']} "
            f"heads={REFERENCE['n_heads']} mlp={REFERENCE['mlp_hidden']} "
            f"vocab={REFERENCE['vocab']} seq={REFERENCE['seq_len']} batch={REFERENCE['batch']}: "
            f"{result['tokens_per_s']:,.0f} tok/s, step {result['step_time_s'] * 1e3:.0f} ms, "
            f"{result['n_params']:,} params, {result['train_flops_per_token'] / 1e6:.1f} MFLOP/tok, "
            f"{result['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s, threads={result['threads']}")
    try:  # fraction of the machine's measured f32 matmul ceiling, when lmjax (jax) is importable
        from lmjax.monitor.hardware import measure_matmul_flops
        line += f", {result['achieved_flops_per_s'] / measure_matmul_flops():.0%} of f32 matmul"
    except ImportError:
        pass
    print(line)


if __name__ == "__main__":
    main()
