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
from lmjax.dialog import answer_is_correct, user_question


def qa_recall(generator, records, *, max_new_tokens=128, progress=False):
    """(fraction correct, [per-record dict]) for facts dialog records: each record's question is
    answered by `generator`, and scored by the dialog module's rule on its final assistant turn."""
    questions = [user_question(r["dialog"]) for r in records]
    completions = generator.generate(questions, max_new_tokens=max_new_tokens, progress=progress)
    details = []
    for record, completion in zip(records, completions):
        answer = generator.format.last_assistant_text(completion.tokens)
        details.append({
            "people_id": record["people_id"], "attribute": record["attribute"], "expected": record["answer"],
            "answer": answer, "correct": answer_is_correct(answer, record["answer"]), "tool_calls": len(completion.tool_calls),
        })
    return sum(d["correct"] for d in details) / max(len(details), 1), details


class RecallByGeneration:
    """End-of-training evaluator: eval/{set}_recall for dialog record files (JSONL), answered by
    free generation through the lane engine, with the facts tool when `tool_data_dir` is set."""

    at_end = True

    def __init__(self, record_files: dict, tokenizer, *, tool_data_dir=None, lanes=64, chunk=16, max_len=256, limit=None):
        self.record_files, self.tokenizer, self.tool_data_dir = record_files, tokenizer, tool_data_dir
        self.lanes, self.chunk, self.max_len, self.limit = lanes, chunk, max_len, limit
        self.env = None

    def prepare(self, env):
        self.env = env

    def __call__(self, params) -> dict:
        from lmjax.generate.api import Generator
        from lmjax.tools import TOOLS

        tool = TOOLS.get("facts")(self.tool_data_dir) if self.tool_data_dir else None
        generator = Generator(
            self.env.model, params, self.tokenizer, lanes=self.lanes, max_len=self.max_len, chunk=self.chunk,
            tool=tool, layout=self.env.layout,
        )
        metrics, started = {}, time.perf_counter()
        for name, path in self.record_files.items():
            records = read_dialogs(path)[: self.limit or None]
            metrics[f"eval/{name}_recall"], _ = qa_recall(generator, records, progress=self.env.progress)
        metrics["time/recall_s"] = time.perf_counter() - started
        return metrics


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lmjax.eval.recall", description="Facts recall through generation.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--lanes", type=int, default=None, help="default: eval.recall_lanes of the run")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each set")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from lmjax.cli import run

    return run("lmjax.eval.recall", parse_args, _recall_of_a_run, argv)


def _recall_of_a_run(args) -> int:
    """Recall of a saved run's checkpoint, printed as one JSON object."""
    from lmjax.xla_flags import tune_xla_cpu_flags

    tune_xla_cpu_flags()
    from lmjax.eval import EvalEnv
    from lmjax.generate.load import load_run
    from lmjax.run_dir import read_run_config, require_facts_data

    config = read_run_config(args.workdir)
    if config.data.name != "facts":
        raise ValueError(f"Recall needs a facts run; {args.workdir!r} trained on {config.data.name!r}.")
    data_dir = require_facts_data(config, args.workdir)  # before the restore: a missing folder costs nothing
    config, model, params, task = load_run(args.workdir, args.step)
    evaluator = RecallByGeneration(
        task.info["recall_sets"], task.tokenizer, tool_data_dir=data_dir if config.data.mode == "tool" else None,
        lanes=args.lanes or config.eval.recall_lanes, chunk=config.eval.recall_chunk, max_len=config.train.seq_len,
        limit=args.limit,
    )
    evaluator.prepare(EvalEnv(model, progress=True))
    print(json.dumps(evaluator(params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
