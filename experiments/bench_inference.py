"""Every inference speed-up side by side in one run, on SmolLM2-135M imported from its GGUF.

    python experiments/smollm_draft.py                     # once: the draft (a few minutes)
    python experiments/bench_inference.py [--lanes 1 16] [--dialogs 16 64] [--draft runs/smollm_draft]

Part 1, decoding (prompts: `--prompt_len`-token windows of the validation part of Shakespeare,
`--decode_tokens` new tokens, greedy; each time the median of `--repeats` runs after a warm-up):
transformers' `generate` (torch, CPU) on the same GGUF, then lmjax with f32, int8 and int4 (g64,
round-to-nearest) weights (lmjax.quant) and the GGUF's own int4 blocks (Q4_1, loaded without a
float round trip: lmjax.interop.gguf_blocks), each without and with speculative decoding (k drafts
from the distilled SmolLM2 draft of experiments/smollm_draft.py, 20x fewer parameters). A row:
tokens/s, x HF, x lmjax f32, the fraction of the memory-bandwidth floor (reading the row's
weights, as stored in memory, plus the filled KV cache once per new token, at this machine's
read bandwidth measured in the same run; speculative rows can pass 100%: they read the weights
once per several tokens), the acceptance rate, and how many lanes' tokens equal lmjax f32's
(speculative rows: equal to the same weights decoded without speculation, as they must be).

Part 2, the paged cache (experiments/bench_paged.py): contiguous vs paged in the same memory, at
each `--dialogs` count of dialogs sharing a `--system_len`-token system prompt, through the lane
engine. Options of that part are bench_paged.py's.
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

# experiments/ is on the path when run as a script
from bench_generate import agreement, floor_seconds, lmjax_generate  # noqa: E402
from bench_generate_torch import hf_from_gguf, hf_generate  # noqa: E402
from bench_paged import add_cache_arguments, compare_caches  # noqa: E402
from smollm_draft import load_draft, load_smollm2, shakespeare_ids, windows  # noqa: E402

from lmjax.generate.decoder import LaneRequests
from lmjax.generate.speculative import SpeculativeDecoder, run_speculative
from lmjax.monitor.hardware import cpu_model, measure_read_bandwidth
from lmjax.quant.quantize import quantize_params


def memory_bytes(params) -> int:
    """Bytes the weights take in this process's memory (int4 codes one a byte on XLA:CPU)."""
    return sum(x.nbytes for x in jax.tree.leaves(params))


def load_weights(kind, model, params):
    """f32 as imported, a lmjax.quant round-to-nearest spec, or "gguf": the file's own blocks
    (lmjax.interop.gguf_blocks; SmolLM2's: Q4_1 projections, a Q8_0 embedding) never dequantized."""
    if kind == "f32":
        return params
    if kind == "gguf":
        from lmjax.interop.bundled import smollm2_gguf
        from lmjax.interop.gguf_blocks import load_gguf_blocks

        return load_gguf_blocks(smollm2_gguf(), scan_layers=False)[1]
    return quantize_params(model, params, kind)


def speculative_generate_timed(target, params, draft, draft_params, prompts, new_tokens, k, repeats):
    """(tokens [B, new_tokens], median seconds, acceptance rate) of greedy speculative decoding."""
    lanes, prompt_len = prompts.shape
    decoder = SpeculativeDecoder(target, draft, lanes, prompt_len + new_tokens, k)
    requests = LaneRequests.empty(lanes).replace(max_new=np.full(lanes, new_tokens, np.int32))
    run = lambda: run_speculative(decoder, params, draft_params, list(prompts), requests)  # noqa: E731
    tokens, stats = run()  # compiles
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens, stats = run()
        seconds.append(time.perf_counter() - start)
    return np.asarray(tokens), float(np.median(seconds)), stats.acceptance_rate


def decode_rows(model, variants, draft, draft_params, hf, ids, args, bandwidth) -> list[dict]:
    rows = []
    for lanes in args.lanes:
        prompts = windows(ids, lanes, args.prompt_len)
        n = lanes * args.decode_tokens
        theirs, t_hf = hf_generate(hf, prompts, args.decode_tokens, args.repeats)
        rows.append(dict(lanes=lanes, name="HF transformers generate, f32", tok_s=n / t_hf, mb=None, floor=None, acceptance=None,
                         same="-"))
        print(f"lanes={lanes:3d} HF generate f32: {n / t_hf:7.1f} tok/s", flush=True)
        reference = None
        for name, params in variants.items():
            floor = floor_seconds(model.cfg, memory_bytes(params), lanes, args.prompt_len, args.decode_tokens, bandwidth)
            cases = [(name, lambda: lmjax_generate(model, params, prompts, args.decode_tokens, args.repeats,
                                                   args.decode_chunk) + (None,))]
            if draft is not None:
                cases.append((f"{name} + speculative k={args.k}", lambda: speculative_generate_timed(
                    model, params, draft, draft_params, prompts, args.decode_tokens, args.k, args.repeats)))
            plain = None
            for label, case in cases:
                tokens, seconds, acceptance = case()
                reference = tokens if reference is None else reference
                # plain rows against f32; speculative rows against their own weights' plain decoding
                same = agreement(tokens, reference if plain is None else plain).replace("same tokens", f"{lanes}/{lanes}")
                plain = tokens if plain is None else plain
                row = dict(lanes=lanes, name=f"lmjax {label}", tok_s=n / seconds, mb=memory_bytes(params) / 1e6, floor=floor / seconds,
                           acceptance=acceptance, same=same)
                row["x_hf"], row["x_f32"] = row["tok_s"] * t_hf / n, row["tok_s"] / rows_f32(rows, lanes, row)
                rows.append(row)
                print(f"lanes={lanes:3d} {row['name']}: {row['tok_s']:7.1f} tok/s | x{row['x_hf']:.2f} HF | "
                      f"x{row['x_f32']:.2f} f32 | {row['floor']:.0%} of its floor | "
                      f"acceptance {'-' if acceptance is None else f'{acceptance:.2f}'} | {row['same']}", flush=True)
    return rows


def rows_f32(rows, lanes, row) -> float:
    """tokens/s of lmjax f32 (no speculation) at `lanes`: the first lmjax row of that lane count."""
    first = next((r for r in rows if r["lanes"] == lanes and r["name"].startswith("lmjax")), row)
    return first["tok_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lanes", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--decode_tokens", type=int, default=128)
    parser.add_argument("--decode_chunk", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--weights", nargs="+", default=["f32", "int8", "int4-g64", "gguf"],
                        help="f32, lmjax.quant specs (int8, int4-g64, ...), gguf (the file's own Q4_1/Q8_0 blocks)")
    parser.add_argument("--draft", default="runs/smollm_draft", help="experiments/smollm_draft.py's --out ('' = no speculation)")
    parser.add_argument("--k", type=int, default=4)
    args, rest = parser.parse_known_args()
    cache_parser = argparse.ArgumentParser(prog="bench_inference.py (paged part)")
    add_cache_arguments(cache_parser)
    cache_args = cache_parser.parse_args(rest)

    from lmjax.interop.bundled import smollm2_gguf

    model, params, tokenizer = load_smollm2()
    draft, draft_params = load_draft(args.draft) if args.draft else (None, None)
    bandwidth = measure_read_bandwidth()
    n = lambda p: sum(x.size for x in jax.tree.leaves(p))  # noqa: E731
    print(f"{cpu_model()}, {jax.device_count()} jax device(s), jax {jax.__version__}, read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"SmolLM2-135M ({n(params) / 1e6:.1f}M parameters)"
          + (f", draft {n(draft_params) / 1e6:.1f}M ({args.draft})" if draft else ""), flush=True)
    variants = {w: load_weights(w, model, params) for w in args.weights}
    ids = shakespeare_ids(tokenizer, "val")
    rows = decode_rows(model, variants, draft, draft_params, hf_from_gguf(smollm2_gguf()), ids, args, bandwidth)
    paged = compare_caches(model, params, tokenizer, cache_args.dialogs, cache_args, bandwidth) if cache_args.dialogs else []

    print("\n| lanes | decoding | MB in memory | tok/s | x HF | x lmjax f32 | of its floor | acceptance | tokens equal |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        cell = lambda key, fmt: "-" if r.get(key) is None else format(r[key], fmt)  # noqa: E731
        print(f"| {r['lanes']} | {r['name']} | {cell('mb', '.0f')} | {r['tok_s']:.1f} | {cell('x_hf', '.2f')} | {cell('x_f32', '.2f')} | "
              f"{cell('floor', '.0%')} | {cell('acceptance', '.2f')} | {r['same']} |")
    if paged:
        print("\n| dialogs | cache | at once | tok/s | x contiguous | prefill s | decode s | decode at floor | tokens = contiguous |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
        for r in paged:
            print(f"| {r['dialogs']} | {r['cache']} | {r['at_once']} | {r['tok_s']:.1f} | {r['ratio']:.2f} | {r['prefill_s']:.1f} | "
                  f"{r['decode_s']:.1f} | {r['floor_fraction']:.0%} | {r['same']}/{r['dialogs']} |")


if __name__ == "__main__":
    main()
