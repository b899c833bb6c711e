"""What a training step costs per fact seen, for the row layouts the capacity study chose between.

    taskset -c 0 python experiments/capacity/bench_throughput.py   # one core: one slot of --parallel 2

Layouts, each batch built by the real packer from the real facts data (256 people):
  qa 32x256    the facts recipe: question/answer dialogs, 32 rows of 256 tokens (1 fact a dialog)
  bio 16x448   biographies (4 facts each), 16 rows of 448 tokens
  bio 4x448    the study's choice: 4 rows of 448 tokens (4x the updates per exposure)
For each model shape, the layouts' train steps are timed interleaved (median of --repeats), and
one line a layout prints: rows filled (the packer's fill), tokens/s, facts seen per second (a
biography shows 4 facts, a qa dialog 1) and that rate relative to the recipe's layout.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lmjax.xla_flags import tune_xla_cpu_flags

    tune_xla_cpu_flags()

import jax
import numpy as np

from lmjax.config import Optim
from lmjax.data import facts
from lmjax.data.pipeline import train_batches
from lmjax.data.tokenizers.byte import ByteTokenizer
from lmjax.dialog import encode_dialog, to_training_example
from lmjax.models.budget import matched_width
from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.optim.optimizer import make_optimizer
from lmjax.train.state import init_state_fn
from lmjax.train.step import make_train_step

LAYOUTS = {"qa 32x256": ("qa.jsonl", 32, 256, 1), "bio 16x448": ("biographies.jsonl", 16, 448, 4),
           "bio 4x448": ("biographies.jsonl", 4, 448, 4)}
SHAPES = ((40_000, 2, 2), (40_000, 8, 4), (20_000, 1, 1))  # (budget, layers, heads)


def packed_batches(folder, filename, rows, seq_len, count=8):
    tokenizer = ByteTokenizer()
    loss_on = "all" if filename.startswith("bio") else "assistant"
    examples = [to_training_example(encode_dialog(tokenizer, r["dialog"], loss_on, answer=r["answer"] or None))
                for r in facts.read_dialogs(folder / filename)]
    stream = iter(train_batches(examples, seq_len=seq_len, batch_size=rows, seed=0, pack=True))
    return [next(stream) for _ in range(count)]


def dialogs_in(batch):
    return sum(len(np.unique(row[row > 0])) for row in batch["segment_ids"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    folder = facts.load_or_generate(Path(tempfile.mkdtemp()), num_people=256, seed=0, num_unseen=64, alpha=0.0)
    batches = {name: packed_batches(folder, *spec[:3]) for name, spec in LAYOUTS.items()}
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; median of {args.repeats} interleaved steps a layout")
    for budget, n_layers, n_heads in SHAPES:
        s = matched_width(budget, n_layers=n_layers, n_heads=n_heads, min_head_dim=4, fit_mlp=True)
        model = Transformer(TransformerConfig(vocab_size=260, dim=s.dim, n_layers=n_layers, n_heads=n_heads,
                                              n_kv_heads=n_heads, mlp_hidden=s.mlp_hidden, scan_layers=False,
                                              attention_block=64))
        tx, schedule = make_optimizer(Optim(lr=3e-3), 1000)
        steps, states = {}, {}
        for name, (_, rows, seq_len, _) in LAYOUTS.items():
            states[name] = jax.jit(init_state_fn(model, tx, seq_len))(jax.random.PRNGKey(0))
            steps[name] = make_train_step(model.apply, tx, schedule)
            states[name], metrics = steps[name](states[name], batches[name][0])  # compile
            jax.block_until_ready(metrics)
        times = {name: [] for name in LAYOUTS}
        for i in range(args.repeats):
            for name in LAYOUTS:
                start = time.perf_counter()
                states[name], metrics = steps[name](states[name], batches[name][1 + i % 7])
                jax.block_until_ready(metrics)
                times[name].append(time.perf_counter() - start)
        reference = None
        for name, (_, rows, seq_len, facts_each) in LAYOUTS.items():
            step_s = float(np.median(times[name]))
            fill = float(np.mean([(b["segment_ids"] > 0).mean() for b in batches[name]]))
            facts_per_step = np.mean([dialogs_in(b) for b in batches[name]]) * facts_each
            rate = facts_per_step / step_s
            reference = reference or rate
            print(f"{n_layers} layers x {n_heads} heads, width {s.dim}, {s.params:,} params | {name}: fill {fill:.1%}, "
                  f"{step_s * 1000:.1f} ms a step, {rows * seq_len / step_s:,.0f} tokens/s, "
                  f"{rate:,.0f} facts seen/s ({rate / reference:.2f}x the recipe's layout)", flush=True)


if __name__ == "__main__":
    main()
