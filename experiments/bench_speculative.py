"""Speculative decoding (lmjax.generate.speculative) vs the plain Decoder, greedy, side by side.

    python experiments/bench_speculative.py [--task shakespeare|facts] [--target_workdir RUN --draft_workdir RUN]
                                            [--k 2 4 6] [--lanes 1 4] [--new_tokens N] [--out DIR]

Without workdirs it first trains a target and a draft (several times smaller) into --out, then
decodes with both sides. One line a case: lanes, k, tokens/s of the Decoder and of speculative
decoding (median of --repeats timed runs after a warm-up run), the ratio, the acceptance rate,
tokens per target pass, and whether both produced the same tokens (they must: greedy speculative
decoding is the target's own output).

--task shakespeare (default): characters (configs/shakespeare.py), a target (d=256, 6 layers,
5.2M parameters) and a draft (d=64, 2 layers, 0.12M), --train_steps steps each (default 600, the recipe's own).
Prompts are windows of the validation text; every lane generates --new_tokens (default 128).

--task facts: the in-weight facts task (configs/facts.py) on --people people (default 64, i.e.
256 facts), a target (d=256, 3 layers, 2.7M parameters) and a draft (the recipe's d=64, 2 layers,
0.16M), each trained until the recipe's rule (teacher-forced answers >= 96% right) or at most
--train_steps (400) / --draft_steps (1000) steps. Prompts are the first --questions (64) questions
of the qa recall set, asked as `lmjax.eval.recall` asks them (the dialog format's prompt:
<|user|> question <|assistant|>), --lanes at a time, each of its own length (both decoders take
a list of prompts of any lengths, one per lane). Answers end at the dialog format's stop tokens
(<|eod|>, <|user|>, <|database|>) on both sides, or after --new_tokens (default 64); tokens/s
counts the tokens generated, stop tokens included. Also printed: facts recall of the target's
and of the draft's greedy answers on those questions (`lmjax.dialog.answer_is_correct`).
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
from lmjax.generate.speculative import SpeculativeDecoder, SpeculativeStats, run_speculative
from lmjax.monitor.hardware import cpu_model

TARGET = dict(dim=256, n_layers=6, n_heads=4, n_kv_heads=4, mlp_hidden=768)
DRAFT = dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=192)
FACTS_TARGET = dict(dim=256, n_layers=3, n_heads=4, n_kv_heads=4, mlp_hidden=768)
FACTS_DRAFT = dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=256)  # configs/facts.py's model

# Per task: config, target, draft, and the defaults of --train_steps, --draft_steps, --new_tokens.
TASKS = {
    "shakespeare": dict(config="configs/shakespeare.py", target=TARGET, draft=DRAFT, steps=600, draft_steps=None,
                        new_tokens=128),
    "facts": dict(config="configs/facts.py", target=FACTS_TARGET, draft=FACTS_DRAFT, steps=400, draft_steps=1000,
                  new_tokens=64),
}


def train(workdir: Path, config: str, model: dict, steps: int, extra=()):
    """A brief run of `config` (skipped when `workdir` already holds one)."""
    if (workdir / "checkpoints").exists():
        return
    overrides = [f"--config.model.{k}={v}" for k, v in model.items()] + [
        f"--config.train.steps={steps}", f"--config.checkpoint.every={steps}", *extra,
    ]
    subprocess.run([sys.executable, "-m", "lmjax.main", f"--config={config}", f"--workdir={workdir}", *overrides],
                   check=True, cwd=Path(__file__).resolve().parents[1])


def train_overrides(args) -> list:
    if args.task == "shakespeare":
        return ["--config.train.batch_size=16", "--config.train.eval_every=100000"]
    # The recipe's stop rule (eval/qa_acc >= 0.96) ends each run once it knows the facts; recall
    # by generation is measured here, on the benchmark's own questions, not at the end of training.
    return [f"--config.data.num_people={args.people}", "--config.train.batch_size=8", "--config.train.eval_every=50",
            "--config.eval.recall=False"]


def timed(fn, repeats):
    result = fn()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def in_batches(prompts, lanes):
    return [prompts[i: i + lanes] for i in range(0, len(prompts), lanes)]


def decode_batches(decoder, params, batches, requests):
    """The Decoder's greedy tokens for every prompt, `decoder.lanes` prompts a call (a short last
    batch gets empty prompts in its spare lanes: they are never written and never decode)."""
    out = []
    for batch in batches:
        padded = list(batch) + [[] for _ in range(decoder.lanes - len(batch))]
        out += decode_prompts(decoder, params, padded, requests)[: len(batch)]
    return out


def speculate_batches(spec, target_params, draft_params, batches, requests):
    """`run_speculative` over the batches: (token lists, SpeculativeStats summed over batches)."""
    out, total = [], SpeculativeStats(0, 0, 0, 0)
    for batch in batches:
        tokens, stats = run_speculative(spec, target_params, draft_params, batch, requests)
        out += tokens
        total = SpeculativeStats(total.drafted + stats.drafted, total.accepted + stats.accepted,
                                 total.target_passes + stats.target_passes, total.decoded_tokens + stats.decoded_tokens)
    return out, total


def compare(args, target, target_params, draft, draft_params, prompts_for, max_len, stop_ids=()):
    """One line per (lanes, k); returns the Decoder's tokens and the prompts of the last lane count."""
    for lanes in args.lanes:
        batches = in_batches(prompts_for(lanes), lanes)
        requests = LaneRequests.empty(lanes).replace(max_new=np.full(lanes, args.new_tokens, np.int32))
        decoder = Decoder(target, lanes, max_len, chunk=args.chunk, stop_ids=stop_ids)
        plain, plain_s = timed(lambda: decode_batches(decoder, target_params, batches, requests), args.repeats)
        plain_tps = sum(map(len, plain)) / plain_s
        for k in args.k:
            spec = SpeculativeDecoder(target, draft, lanes, max_len, k, rounds=args.rounds, stop_ids=stop_ids)
            (tokens, stats), spec_s = timed(lambda: speculate_batches(spec, target_params, draft_params, batches, requests),
                                            args.repeats)
            spec_tps = sum(map(len, tokens)) / spec_s
            print(f"lanes {lanes:3d}  k {k}  decoder {plain_tps:8.1f} tok/s  speculative {spec_tps:8.1f} tok/s  "
                  f"x{spec_tps / plain_tps:.2f}  acceptance {stats.acceptance_rate:.2f}  "
                  f"tokens/target pass {stats.tokens_per_target_pass:.2f}  same tokens: {tokens == plain}", flush=True)
    return plain, [p for batch in batches for p in batch]


def shakespeare(args, task, target, target_params, draft, draft_params):
    from lmjax.data.shakespeare import load_text, split_train_val

    _, val = split_train_val(load_text(), 0.05)
    ids = np.asarray(task.tokenizer.encode(val), np.int32)

    def prompts_for(lanes):
        starts = np.linspace(0, len(ids) - args.prompt_len - 1, lanes).astype(int)
        return [ids[s: s + args.prompt_len].tolist() for s in starts]

    plain, prompts = compare(args, target, target_params, draft, draft_params, prompts_for, args.prompt_len + args.new_tokens)
    sample = task.tokenizer.decode(plain[0])
    print(f"# lane 0 continues {task.tokenizer.decode(prompts[0])!r} with {sample[:80]!r}")


def facts(args, task, target, target_params, draft, draft_params):
    from lmjax.data.facts import ATTRIBUTE_VALUES, read_dialogs
    from lmjax.dialog import answer_is_correct, format_for, user_question

    fmt = format_for(task.tokenizer)
    records = read_dialogs(task.info["recall_sets"]["qa"])[: args.questions]  # as lmjax.eval.recall --limit takes them
    questions = [user_question(r["dialog"]) for r in records]
    prompts = [fmt.prompt(q) for q in questions]
    max_len = max(map(len, prompts)) + args.new_tokens
    lengths = sorted(map(len, prompts))
    print(f"# {len(prompts)} qa questions (prompts of {lengths[0]}-{lengths[-1]} tokens), answers stop at "
          f"{[task.tokenizer.decode([t]) for t in fmt.stop_ids]} or after {args.new_tokens} tokens")
    plain, _ = compare(args, target, target_params, draft, draft_params, lambda lanes: prompts, max_len, fmt.stop_ids)

    def recall(answers):
        texts = [fmt.last_assistant_text(a) for a in answers]
        right = [answer_is_correct(t, r["answer"], ATTRIBUTE_VALUES.get(r["attribute"], ())) for t, r in zip(texts, records)]
        return sum(right), texts

    lanes = max(args.lanes)  # the draft's own greedy answers, once, untimed
    requests = LaneRequests.empty(lanes).replace(max_new=np.full(lanes, args.new_tokens, np.int32))
    draft_answers = decode_batches(Decoder(draft, lanes, max_len, chunk=args.chunk, stop_ids=fmt.stop_ids), draft_params,
                                   in_batches(prompts, lanes), requests)
    (target_right, texts), (draft_right, _) = recall(plain), recall(draft_answers)
    n = len(records)
    print(f"# recall of greedy answers: target {target_right}/{n} ({target_right / n:.0%}), "
          f"draft {draft_right}/{n} ({draft_right / n:.0%})")
    print(f"# lane 0 answers {questions[0]!r} with {texts[0]!r} (expected {records[0]['answer']!r})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="shakespeare")
    parser.add_argument("--target_workdir")
    parser.add_argument("--draft_workdir")
    parser.add_argument("--out", help="default: runs/bench_speculative (shakespeare), runs/bench_speculative_facts")
    parser.add_argument("--train_steps", type=int, help="steps of each run (facts: the target's at most); default: per task")
    parser.add_argument("--draft_steps", type=int, help="facts: the draft's steps at most (default 1000)")
    parser.add_argument("--people", type=int, default=64, help="facts: people in the population (4 facts each)")
    parser.add_argument("--questions", type=int, default=64, help="facts: the first N questions of the qa recall set")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--lanes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt_len", type=int, default=32, help="shakespeare: prompt characters")
    parser.add_argument("--new_tokens", type=int, help="shakespeare: tokens per lane (128); facts: at most (64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="speculative steps per decode call")
    parser.add_argument("--chunk", type=int, default=16, help="Decoder steps per decode call")
    args = parser.parse_args()
    spec = TASKS[args.task]
    args.train_steps = args.train_steps or spec["steps"]
    args.draft_steps = args.draft_steps or spec["draft_steps"] or args.train_steps
    args.new_tokens = args.new_tokens or spec["new_tokens"]

    out = Path(args.out or ("runs/bench_speculative" if args.task == "shakespeare" else f"runs/bench_speculative_{args.task}"))
    target_dir = Path(args.target_workdir) if args.target_workdir else out / "target"
    draft_dir = Path(args.draft_workdir) if args.draft_workdir else out / "draft"
    if not args.target_workdir:
        train(target_dir, spec["config"], spec["target"], args.train_steps, train_overrides(args))
    if not args.draft_workdir:
        train(draft_dir, spec["config"], spec["draft"], args.draft_steps, train_overrides(args))
    target_config, target, target_params, task = load_run(target_dir)
    draft_config, draft, draft_params, _ = load_run(draft_dir)
    if task.name != args.task or draft_config.data.name != args.task:
        sys.exit(f"--task {args.task} needs {args.task} runs; the target trained on {task.name!r}, "
                 f"the draft on {draft_config.data.name!r}.")
    n_params = lambda p: sum(x.size for x in jax.tree_util.tree_leaves(p))  # noqa: E731
    target_n, draft_n = n_params(target_params), n_params(draft_params)
    print(f"# {cpu_model()}; jax {jax.__version__} on {jax.default_backend()}")
    if args.task == "shakespeare":
        print(f"# target {target_n / 1e6:.2f}M params ({target_dir}), draft {draft_n / 1e6:.2f}M "
              f"({draft_dir}); prompt {args.prompt_len} chars, {args.new_tokens} new tokens, greedy")
        shakespeare(args, task, target, target_params, draft, draft_params)
    else:
        step = lambda d: max(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit())  # noqa: E731
        print(f"# facts in-weight, {target_config.data.num_people} people; target {target_n / 1e6:.2f}M params "
              f"(d={target.cfg.dim}, {target.cfg.n_layers} layers, step {step(target_dir)}, {target_dir}), draft "
              f"{draft_n / 1e6:.2f}M (d={draft.cfg.dim}, {draft.cfg.n_layers} layers, step {step(draft_dir)}, {draft_dir}): "
              f"{target_n / draft_n:.1f}x smaller; greedy")
        facts(args, task, target, target_params, draft, draft_params)


if __name__ == "__main__":
    main()
