"""Speculative decoding (lmjax.generate.speculative) vs the plain Decoder, greedy, side by side.

    python experiments/bench_speculative.py [--target_workdir RUN --draft_workdir RUN] [--k 2 4 6]
                                            [--lanes 1 4] [--new_tokens 128] [--out DIR]

Without workdirs it first trains, on Shakespeare characters (configs/shakespeare.py), a target
(d=256, 6 layers, 4.8M parameters) and a draft (d=64, 2 layers, 0.1M) for --train_steps steps
each into --out. Prompts are windows of the validation text. One line a case: lanes, k, tokens/s
of the Decoder and of speculative decoding (median of --repeats timed runs after a warm-up run),
the ratio, the acceptance rate, tokens per target pass, and whether both produced the same tokens
(they must: greedy speculative decoding is the target's own output).
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # XLA:CPU runtime choices must precede the jax import
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmjax.xla_flags import tune_xla_cpu_flags

    tune_xla_cpu_flags()

import jax
import numpy as np

from bench_generate import decode_prompts  # noqa: E402  (experiments/ is on the path when run as a script)
from lmjax.generate.decoder import Decoder, LaneRequests
from lmjax.generate.load import load_run
from lmjax.generate.speculative import SpeculativeDecoder, run_speculative
from lmjax.monitor.hardware import cpu_model

TARGET = dict(dim=256, n_layers=6, n_heads=4, n_kv_heads=4, mlp_hidden=768)
DRAFT = dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=192)


def train(workdir: Path, model: dict, steps: int):
    """A brief configs/shakespeare.py run (skipped when `workdir` already holds one)."""
    if (workdir / "checkpoints").exists():
        return
    overrides = [f"--config.model.{k}={v}" for k, v in model.items()] + [
        f"--config.train.steps={steps}", "--config.train.batch_size=16", "--config.train.eval_every=100000",
        f"--config.checkpoint.every={steps}",
    ]
    subprocess.run([sys.executable, "-m", "lmjax.main", "--config=configs/shakespeare.py", f"--workdir={workdir}", *overrides],
                   check=True, cwd=Path(__file__).resolve().parents[1])


def timed(fn, repeats):
    result = fn()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target_workdir")
    parser.add_argument("--draft_workdir")
    parser.add_argument("--out", default="runs/bench_speculative")
    parser.add_argument("--train_steps", type=int, default=200)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--lanes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="speculative steps per decode call")
    parser.add_argument("--chunk", type=int, default=16, help="Decoder steps per decode call")
    args = parser.parse_args()

    out = Path(args.out)
    target_dir = Path(args.target_workdir) if args.target_workdir else out / "target"
    draft_dir = Path(args.draft_workdir) if args.draft_workdir else out / "draft"
    if not args.target_workdir:
        train(target_dir, TARGET, args.train_steps)
    if not args.draft_workdir:
        train(draft_dir, DRAFT, args.train_steps)
    _, target, target_params, task = load_run(target_dir)
    _, draft, draft_params, _ = load_run(draft_dir)
    n_params = lambda p: sum(x.size for x in jax.tree_util.tree_leaves(p))  # noqa: E731
    print(f"# {cpu_model()}; jax {jax.__version__} on {jax.default_backend()}")
    print(f"# target {n_params(target_params) / 1e6:.2f}M params ({target_dir}), draft {n_params(draft_params) / 1e6:.2f}M "
          f"({draft_dir}); prompt {args.prompt_len} chars, {args.new_tokens} new tokens, greedy")

    from lmjax.data.shakespeare import load_text, split_train_val

    _, val = split_train_val(load_text(), 0.05)
    ids = np.asarray(task.tokenizer.encode(val), np.int32)
    max_len = args.prompt_len + args.new_tokens
    for lanes in args.lanes:
        starts = np.linspace(0, len(ids) - args.prompt_len - 1, lanes).astype(int)
        prompts = [ids[s: s + args.prompt_len].tolist() for s in starts]
        requests = LaneRequests.empty(lanes).replace(max_new=np.full(lanes, args.new_tokens, np.int32))
        decoder = Decoder(target, lanes, max_len, chunk=args.chunk)
        plain, plain_s = timed(lambda: decode_prompts(decoder, target_params, prompts, requests), args.repeats)
        plain_tps = lanes * args.new_tokens / plain_s
        for k in args.k:
            spec = SpeculativeDecoder(target, draft, lanes, max_len, k, rounds=args.rounds)
            (tokens, stats), spec_s = timed(lambda: run_speculative(spec, target_params, draft_params, prompts, requests),
                                            args.repeats)
            spec_tps = lanes * args.new_tokens / spec_s
            print(f"lanes {lanes:3d}  k {k}  decoder {plain_tps:8.1f} tok/s  speculative {spec_tps:8.1f} tok/s  "
                  f"x{spec_tps / plain_tps:.2f}  acceptance {stats.acceptance_rate:.2f}  "
                  f"tokens/target pass {stats.tokens_per_target_pass:.2f}  same tokens: {tokens == plain}", flush=True)
    sample = task.tokenizer.decode(tokens[0])
    print(f"# lane 0 continues {task.tokenizer.decode(prompts[0])!r} with {sample[:80]!r}")


if __name__ == "__main__":
    main()
