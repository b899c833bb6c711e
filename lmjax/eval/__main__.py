"""python -m lmjax.eval --workdir W [--step S] [--tasks facts_recall,shakespeare_bpc] [--limit N]
python -m lmjax.eval --model SmolLM2.gguf|HF_FOLDER --tasks shakespeare_bpc,multiple_choice=q.jsonl [--out DIR]

Evaluates a run's checkpoint (default: the newest intact one) or imported weights on tasks
(lmjax.eval.tasks; default: the run's eval.tasks, else its task's own). A run's results go to
W/eval/STEP/results.json and, with the checkpoint's step, to W/metrics.jsonl (and TensorBoard /
wandb when the run uses them) unless --no_log; imported weights' to DIR/results.json with
--out. The metrics are printed as one JSON object.
"""
import json
import sys
import time

from lmjax import cli

PROG = "lmjax.eval"


def parse_args(argv):
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a training run folder")
    source.add_argument("--model", help="imported weights: a GGUF file or a Hugging Face Llama folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest intact one)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: the run's eval.tasks or its task's)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each task (quick checks)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens a scored row (default: train.seq_len; --model: 1024)")
    p.add_argument("--rows", type=int, default=16, help="rows a scoring batch")
    p.add_argument("--lanes", type=int, default=None, help="generation lanes (default: eval.recall_lanes; --model: 16)")
    p.add_argument("--out", default=None, help="--model: the folder for results.json")
    p.add_argument("--no_log", action="store_true", help="write results.json only, not the run's metrics")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.step is not None and args.model:
        p.error("--step is for a run (--workdir)")
    for name in ("limit", "seq_len", "rows", "lanes"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    return args


def main(argv=None) -> int:
    return cli.run(PROG, parse_args, evaluate, argv)


def evaluate(args) -> int:
    from lmjax.xla_flags import tune_xla_cpu_flags

    tune_xla_cpu_flags()
    from lmjax.eval import record
    from lmjax.eval.evaluator import load_subject
    from lmjax.eval.tasks import default_tasks, make_tasks, parse_task_list, run_tasks

    started = time.perf_counter()
    if args.tasks:
        specs = parse_task_list(args.tasks)  # a wrong name fails before anything is loaded
    subject = load_subject(workdir=args.workdir, step=args.step, pretrained=args.model)
    if not args.tasks:
        specs = parse_task_list(default_tasks(subject))
    tasks = make_tasks(subject, specs, args.limit)
    evaluator = subject.evaluator(seq_len=args.seq_len, rows=args.rows, lanes=args.lanes, progress=not args.no_progress)
    metrics = run_tasks(tasks, evaluator)
    payload = {"step": subject.step, "source": subject.source, "tasks": list(tasks), "limit": args.limit,
               "metrics": metrics, "seconds": round(time.perf_counter() - started, 2)}
    if args.workdir:
        record.write_results(record.results_path(args.workdir, subject.step), payload)
        if not args.no_log:
            record.append_metrics(args.workdir, subject.config, subject.step, metrics)
    elif args.out:
        from pathlib import Path

        record.write_results(Path(args.out) / record.RESULTS_FILE, payload)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
