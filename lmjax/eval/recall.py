"""Facts recall through free generation: `eval/qa_recall` (and `eval/qa_unseen_recall` in-tool).

Each question is asked as a prompt; the model answers freely (in-tool: it writes a query, the
real database answers, it goes on). The answer counts as correct when the last assistant turn
states the whole answer and a period (`lmjax.dialog.answer_is_correct`): it ends with
f"{answer}." after a word boundary, and with no longer value of the asked attribute ("a civil
engineer." does not answer "engineer", "a graphic designer." does not answer "designer").
`eval/{set}_recall_suffix` scores the same answers by the original codebase's looser rule (the
turn ends with f"{answer}.", whatever comes before), for comparison with its numbers.

    python -m lmjax.eval.recall --workdir W [--step N] [--lanes 64] [--limit 200]
"""
import json
import sys
import time

from lmjax import cli
from lmjax.data.facts import read_dialogs
from lmjax.dialog import answer_is_correct, answer_is_suffix, user_question


def qa_recall(generator, records, *, known_answers=None, max_new_tokens=128, progress=False):
    """(fraction correct, [per-record dict]) for dialog records with answers: each record's
    question is answered by `generator`, and scored by the dialog module's rule on its final
    assistant turn ("correct"; "correct_suffix": the original codebase's looser rule).
    `known_answers`: attribute -> every value an answer could state, so that a longer value
    ending in the expected one is not taken for it."""
    known_answers = known_answers or {}
    questions = [user_question(r["dialog"]) for r in records]
    completions = generator.generate(questions, max_new_tokens=max_new_tokens, progress=progress)
    details = []
    for record, completion in zip(records, completions):
        answer = generator.format.last_assistant_text(completion.tokens)
        details.append({
            "people_id": record["people_id"], "attribute": record["attribute"], "expected": record["answer"],
            "answer": answer, "correct": answer_is_correct(answer, record["answer"], known_answers.get(record["attribute"], ())),
            "correct_suffix": answer_is_suffix(answer, record["answer"]), "tool_calls": len(completion.tool_calls),
        })
    return sum(d["correct"] for d in details) / max(len(details), 1), details


class RecallByGeneration:
    """End-of-training evaluator: eval/{set}_recall (whole answers) and eval/{set}_recall_suffix
    (the original's looser rule) for dialog record files (JSONL), answered by free generation
    through the lane engine, with the facts tool when `tool_data_dir` is set."""

    at_end = True

    def __init__(self, record_files: dict, tokenizer, *, known_answers=None, tool_data_dir=None, lanes=64, chunk=16,
                 max_len=256, limit=None):
        self.record_files, self.tokenizer, self.tool_data_dir = record_files, tokenizer, tool_data_dir
        self.known_answers = known_answers
        self.lanes, self.chunk, self.max_len, self.limit = lanes, chunk, max_len, limit
        self.env = None

    def metric_names(self) -> list:
        """The names `__call__` reports."""
        return sorted([f"eval/{name}_recall{rule}" for name in self.record_files for rule in ("", "_suffix")]
                      + ["time/recall_s"])

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
            metrics[f"eval/{name}_recall"], details = qa_recall(
                generator, records, known_answers=self.known_answers, progress=self.env.progress
            )
            metrics[f"eval/{name}_recall_suffix"] = sum(d["correct_suffix"] for d in details) / max(len(details), 1)
        metrics["time/recall_s"] = time.perf_counter() - started
        return metrics


def parse_args(argv):
    p = cli.ArgumentParser(prog="lmjax.eval.recall", description="Facts recall through generation.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest intact one)")
    p.add_argument("--lanes", type=int, default=None, help="default: eval.recall_lanes of the run")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each set")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return cli.run("lmjax.eval.recall", parse_args, _recall_of_a_run, argv)


def _recall_of_a_run(args) -> int:
    """Recall of a saved run's checkpoint, printed as one JSON object."""
    from lmjax.xla_flags import tune_xla_cpu_flags

    tune_xla_cpu_flags()
    from lmjax.data.facts import ATTRIBUTE_VALUES
    from lmjax.eval import EvalEnv
    from lmjax.generate.load import load_run
    from lmjax.run_dir import read_run_config, require_facts_data

    config = read_run_config(args.workdir)
    if config.data.name != "facts":
        raise ValueError(f"Recall needs a facts run; {args.workdir!r} trained on {config.data.name!r}.")
    data_dir = require_facts_data(config, args.workdir)  # before the restore: a missing folder costs nothing
    config, model, params, task = load_run(args.workdir, args.step)
    evaluator = RecallByGeneration(
        task.info["recall_sets"], task.tokenizer, known_answers=ATTRIBUTE_VALUES, tool_data_dir=data_dir if config.data.mode == "tool" else None,
        lanes=args.lanes or config.eval.recall_lanes, chunk=config.eval.recall_chunk, max_len=config.train.seq_len,
        limit=args.limit,
    )
    evaluator.prepare(EvalEnv(model, progress=True))
    print(json.dumps(evaluator(params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
