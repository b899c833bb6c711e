"""The training loop: config -> data -> model -> jitted steps -> metrics, evals, checkpoints.

Rerunning on the same workdir resumes from the latest checkpoint, bit-identically on CPU: the
checkpoint holds params, optimizer state, step, PRNG key and the data iterator's position.
SIGTERM (and Ctrl-C) saves a checkpoint at the current step before exiting.
"""
import functools
import json
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
import psutil
from tqdm import tqdm

from lmjax.config import check_resume_compatible, to_json, validate
from lmjax.data.datasets import build_task
from lmjax.data.pipeline import InputShards, longest_example
from lmjax.data.prefetch import Prefetcher
from lmjax.eval.teacher_forced import eval_batches, evaluate_task, make_eval_step
from lmjax.models import build_model
from lmjax.monitor.metrics import MetricWriter
from lmjax.monitor.profiler import make_profiler
from lmjax.parallel.layout import Layout
from lmjax.registry import ConfigError
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.optimizer import make_optimizer
from lmjax.train.state import abstract_train_state, init_state_fn, state_shardings
from lmjax.train.step import make_train_step
from lmjax.train.step_cost import flops_limit, step_cost_metrics


def seconds_since_process_start():
    return time.time() - psutil.Process().create_time()


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.received = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def parse_stop_when(text):
    """'eval/qa_acc>=0.95' -> predicate on a metrics dict; '' -> never stop early."""
    if not text:
        return lambda metrics: False
    for op, compare in ((">=", lambda a, b: a >= b), ("<=", lambda a, b: a <= b)):
        if op in text:
            name, threshold = (part.strip() for part in text.split(op))
            threshold = float(threshold)
            return lambda metrics: name in metrics and compare(metrics[name], threshold)
    raise ConfigError(f"train.stop_when must look like 'eval/qa_acc>=0.95' or 'eval/loss<=1.5', got {text!r}.")


def _count_step_cost(train_step, state, batch, model, tx, schedule, config, layout, writer, workdir, max_segment_len):
    """Log the step's FLOPs (compiled and analytic) once; returns (FLOPs per step, FLOP/s limit)."""
    cost = step_cost_metrics(train_step, state, batch, model, state.params, tx, schedule, config, layout, max_segment_len)
    limit, limit_source = flops_limit(config)
    numbers = {k: v for k, v in cost.items() if k.startswith("perf/")}
    if limit:
        numbers["perf/flops_limit"] = limit
    if int(state.step) == 0:  # a resumed run logged them when it started
        writer.write(0, numbers)
    if jax.process_index() == 0:  # how each number was obtained, beside the numbers
        details = {**numbers, "flops_source": cost["source"], "analytic_counts": cost["analytic_counts"],
                   "flops_limit_source": limit_source}
        (workdir / "step_cost.json").write_text(json.dumps(details, indent=2))
    return cost["perf/flops_per_step"], limit


def train(config, workdir) -> dict:
    """Run (or resume) training in `workdir`; returns the summary also written to summary.json."""
    validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    saved_config = workdir / "config.json"
    if saved_config.exists() and (workdir / "checkpoints").exists():
        check_resume_compatible(json.loads(saved_config.read_text()), config)
    if jax.process_index() == 0:  # one writer; the rename keeps readers from seeing half a file
        tmp = saved_config.with_name(".config.json.tmp")
        tmp.write_text(to_json(config))
        os.replace(tmp, saved_config)
    t = config.train
    should_stop = parse_stop_when(t.get("stop_when", ""))
    reached = None

    task = build_task(config, workdir)
    model = build_model(config)
    layout = Layout.from_config(config)
    layout.check_rows(t.batch_size, "train.batch_size")
    layout.check_rows(config.eval.batch_size, "eval.batch_size")
    tx, schedule = make_optimizer(config.optim, t.steps)
    init_state = init_state_fn(model, tx, t.seq_len)
    shardings = state_shardings(model, tx, t.seq_len, layout)

    rows = layout.process_rows(t.batch_size)
    batches = InputShards(
        task.train, seq_len=t.seq_len, batch_size=t.batch_size, seed=config.seed, pack=config.data.get("pack", False),
        shards=config.data.get("input_shards", 0) or len(layout.row_spans(t.batch_size)), rows=rows,
    )
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        state, data_state = checkpointer.restore(abstract_train_state(init_state, config.seed, shardings))
        batches.set_state(data_state)
    else:
        state = layout.jit(init_state, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
    start = int(state.step)

    is_lead = jax.process_index() == 0
    writer = MetricWriter(workdir, config, enabled=is_lead, resume_step=resume_step)
    probes_every = config.logging.get("probes_every", 0)
    # Every packed sequence is one whole example, so attention can skip keys beyond the longest.
    max_segment_len = longest_example(task.train)
    train_step = make_train_step(
        functools.partial(model.apply, max_segment_len=max_segment_len), tx, schedule, config.optim.grad_accum, layout=layout, shardings=shardings, probes=probes_every > 0
    )
    eval_step = make_eval_step(model.apply, layout=layout, param_shardings=shardings.params)
    eval_sets = {name: eval_batches(examples, config.eval.batch_size) for name, examples in task.eval_sets.items()}
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    if start == 0:
        writer.write(0, {"model/params": n_params})

    prefetcher = Prefetcher(batches)
    profiler = make_profiler(config, workdir)
    count_flops = config.logging.get("count_flops", True)
    flops_per_step, limit = None, None
    stop = StopSignal()
    bar = tqdm(total=t.steps, initial=start, disable=not (is_lead and config.logging.progress_bar), dynamic_ncols=True)
    last_eval, last_log = {}, {}
    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    step = start
    try:
        while step < t.steps and stop.received is None and reached is None:
            with profiler.data_wait():
                local_batch = next(prefetcher)
            # Real tokens in this process's rows, scaled to the global batch.
            window_tokens += int(np.count_nonzero(local_batch["segment_ids"])) * t.batch_size // (rows[1] - rows[0])
            batch = layout.put_local_rows(local_batch, t.batch_size)
            if count_flops and flops_per_step is None:
                flops_per_step, limit = _count_step_cost(
                    train_step, state, batch, model, tx, schedule, config, layout, writer, workdir, max_segment_len
                )
                window_start = time.perf_counter()  # the window times training steps, not the count
            profiler.before_step(step)
            state, metrics = train_step(state, batch)
            profiler.after_step(step, (state, metrics))
            step += 1
            window_steps += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not (probes_every and step % probes_every == 0):
                    metrics = {k: v for k, v in metrics.items() if not k.startswith("probe/")}
                elapsed = time.perf_counter() - window_start
                metrics["train/tokens_per_s"] = window_tokens / elapsed
                metrics["train/step_time_s"] = elapsed / window_steps
                if flops_per_step is not None:
                    metrics["perf/flops_per_s"] = flops_per_step * window_steps / elapsed
                    if limit:
                        metrics["perf/mfu"] = metrics["perf/flops_per_s"] / limit
                metrics.update(profiler.window_metrics(elapsed, window_steps))
                last_log = metrics
                writer.write(step, metrics)
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)
            if step % t.eval_every == 0 or step == t.steps:
                last_eval = evaluate_task(eval_step, state.params, task.kind, eval_sets)
                last_eval["time/since_start_s"] = seconds_since_process_start()
                writer.write(step, last_eval)
                if should_stop(last_eval):
                    reached = step
                shown = {k.split("/")[-1]: f"{v:.3f}" for k, v in last_eval.items() if "acc" in k or k == "eval/loss"}
                bar.set_postfix(shown, refresh=False)
            last_step = step == t.steps or stop.received is not None or reached is not None
            if step % config.checkpoint.every == 0 or last_step:
                checkpointer.save(step, state, prefetcher.get_state(), wait=last_step)
            if step % t.log_every == 0:  # the next window times training steps only
                window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    finally:
        bar.close()
        profiler.close()
        prefetcher.close()
        stop.restore()
        checkpointer.close()

    if task.kind == "facts" and config.eval.get("recall", False) and stop.received is None:
        from lmjax.eval.recall import recall_metrics

        recall = recall_metrics(
            model, state.params, task, config, progress=is_lead and config.logging.progress_bar, layout=layout
        )
        recall["time/since_start_s"] = seconds_since_process_start()
        writer.write(step, recall)
        last_eval = {**last_eval, **recall}

    summary = {
        "step": step,
        "interrupted": stop.received is not None,
        "stopped_early": reached is not None,
        "params": n_params,
        "seconds_since_start": round(seconds_since_process_start(), 2),
        **last_log,
        **last_eval,
    }
    writer.close()
    if is_lead:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
