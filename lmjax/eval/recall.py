"""Facts recall through free generation: `eval/qa_recall` (and `eval/qa_unseen_recall` in-tool).

Each question is asked as a prompt; the model answers freely (in-tool: it writes a query, the
real database answers, it goes on). The answer counts as correct when the last assistant turn
ends with f"{answer}.", the original codebase's rule.

    python -m lmjax.eval.recall --workdir W [--step N] [--lanes 64] [--limit 200]
"""
import argparse
import json
import sys
import time

from lmjax.data.facts import read_dialogs
from lmjax.generate.engine import after_last


def last_assistant_text(completion, tokenizer, turn_id, stop_ids):
    """Text of the final assistant turn of a completion, without the token that ended it."""
    tokens = list(completion.tokens)
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(after_last(tokens, turn_id))


def qa_recall(generator, records, *, max_new_tokens=128, progress=False):
    """(fraction correct, [per-record dict]) for facts dialog records."""
    questions = [next(t["content"] for t in r["dialog"] if t["source"] == "user") for r in records]
    completions = generator.generate(questions, max_new_tokens=max_new_tokens, progress=progress)
    fmt = generator.format
    details = []
    for record, completion in zip(records, completions):
        answer = last_assistant_text(completion, generator.tokenizer, fmt.turn_id, set(fmt.stop_ids))
        details.append({
            "people_id": record["people_id"], "attribute": record["attribute"], "expected": record["answer"],
            "answer": answer, "correct": answer.endswith(f"{record['answer']}."), "tool_calls": len(completion.tool_calls),
        })
    return sum(d["correct"] for d in details) / max(len(details), 1), details


def recall_metrics(model, params, task, config, *, progress=False, limit=None, layout=None):
    """eval/{set}_recall for every recall set of a facts task (tools executed for real in-tool).
    `layout`: generate on that mesh (`params` laid out on it, as in training)."""
    from lmjax.generate.api import Generator
    from lmjax.tools import TOOLS

    tool = TOOLS.get("facts")(task.info["data_dir"]) if config.data.mode == "tool" else None
    generator = Generator(
        model, params, task.tokenizer, lanes=config.eval.recall_lanes, max_len=config.train.seq_len,
        chunk=config.eval.get("recall_chunk", 16), tool=tool, layout=layout,
    )
    metrics, started = {}, time.perf_counter()
    for name, path in task.info["recall_sets"].items():
        records = read_dialogs(path)[: limit or None]
        metrics[f"eval/{name}_recall"], _ = qa_recall(generator, records, progress=progress)
    metrics["time/recall_s"] = time.perf_counter() - started
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lmjax.eval.recall", description="Facts recall through generation.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--lanes", type=int, default=None, help="default: eval.recall_lanes of the run")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each set")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from lmjax.xla_flags import tune_xla_cpu_flags

    tune_xla_cpu_flags()
    from lmjax.generate.load import load_run

    try:
        config, model, params, task = load_run(args.workdir, args.step)
        if task.kind != "facts":
            raise ValueError(f"Recall needs a facts run; {args.workdir!r} trained on {config.data.name!r}.")
    except ValueError as error:
        print(f"lmjax.eval.recall: error: {error}", file=sys.stderr)
        return 2
    if args.lanes:
        config.eval.recall_lanes = args.lanes
    metrics = recall_metrics(model, params, task, config, progress=True, limit=args.limit)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
