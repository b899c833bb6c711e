"""Everything a training run needs, built once from a checked config: `build_run(config, workdir)`.

The `Run` holds the task's batches and evaluators, the model, the device layout, the optimizer,
the train state (fresh, or restored from the workdir's newest intact checkpoint), the jitted step, the
metric writer, the checkpointer and the profiler. `Run.advance()` is one optimizer step; the
loop (lmjax.train.loop) decides what happens around it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import psutil
from tqdm import tqdm

from lmjax.config import RunConfig, check_resume_compatible, check_stop_when_names, to_json
from lmjax.data.pipeline import InputShards, longest_example
from lmjax.data.prefetch import Prefetcher
from lmjax.eval import EvalEnv
from lmjax.models import build_model
from lmjax.monitor.metrics import MetricWriter
from lmjax.monitor.profiler import make_profiler
from lmjax.parallel.layout import Layout
from lmjax.run_dir import CHECKPOINTS, CONFIG_FILE, Checkpointer, read_run_config, save_run_tokenizer, write_run_config
from lmjax.tasks import TASKS
from lmjax.optim.optimizer import make_optimizer
from lmjax.train.state import abstract_train_state, init_state_fn, state_from_params_fn, state_shardings
from lmjax.train.step import make_train_step
from lmjax.train.step_cost import flops_limit, step_cost_metrics


def seconds_since_process_start():
    return time.time() - psutil.Process().create_time()


@dataclasses.dataclass
class Window:
    """Steps, real tokens and wall time since the last logging window began."""

    steps: int = 0
    tokens: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def restart(self):
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()


@dataclasses.dataclass
class Run:
    config: RunConfig
    workdir: Path
    model: Any
    layout: Layout
    tx: Any
    schedule: Any
    state: Any
    train_step: Any
    batches: Prefetcher
    rows: tuple  # this process's rows [start, stop) of every global batch
    evaluators: list
    writer: MetricWriter
    checkpointer: Checkpointer
    profiler: Any
    bar: tqdm
    max_segment_len: int
    n_params: int
    resumed_from: int | None
    is_lead: bool
    step: int  # the state's step, kept on the host so that reading it never waits for the device
    window: Window = dataclasses.field(default_factory=Window)
    flops_per_step: float | None = None
    flops_limit: float | None = None

    def advance(self) -> dict:
        """One optimizer step on the next batch; returns the step's metrics (device arrays)."""
        t = self.config.train
        with self.profiler.data_wait():
            local_batch = next(self.batches)
        # Real tokens in this process's rows, scaled to the global batch.
        self.window.tokens += int(np.count_nonzero(local_batch["segment_ids"])) * t.batch_size // (self.rows[1] - self.rows[0])
        batch = self.layout.put_local_rows(local_batch, t.batch_size)
        if self.config.logging.count_flops and self.flops_per_step is None:
            self._count_step_cost(batch)
            self.window.start = time.perf_counter()  # the window times training steps, not the count
        self.profiler.before_step(self.step)
        self.state, metrics = self.train_step(self.state, batch)
        self.profiler.after_step(self.step, (self.state, metrics))
        self.step += 1
        self.window.steps += 1
        self.bar.update(1)
        return metrics

    def _count_step_cost(self, batch):
        """Log the step's FLOPs (compiled and analytic) once, and keep them for perf/mfu."""
        c = self.config
        cost = step_cost_metrics(
            self.train_step, self.state, batch, self.model, self.tx, self.schedule, self.layout,
            grad_accum=c.optim.grad_accum, batch_size=c.train.batch_size, seq_len=c.train.seq_len,
            probes=c.logging.probes_every > 0, max_segment_len=self.max_segment_len,
        )
        self.flops_limit, limit_source = flops_limit(c.model.compute_dtype)
        numbers = {k: v for k, v in cost.items() if k.startswith("perf/")}
        if self.flops_limit:
            numbers["perf/flops_limit"] = self.flops_limit
        if self.step == 0:  # a resumed run logged them when it started
            self.writer.write(0, numbers)
        if self.is_lead:  # how each number was obtained, beside the numbers
            details = {**numbers, "flops_source": cost["source"], "analytic_counts": cost["analytic_counts"],
                       "flops_limit_source": limit_source}
            (self.workdir / "step_cost.json").write_text(json.dumps(details, indent=2))
        self.flops_per_step = cost["perf/flops_per_step"]

    def evaluate(self, at_end: bool) -> dict:
        metrics = {}
        for evaluator in self.evaluators:
            if evaluator.at_end == at_end:
                metrics.update(evaluator(self.state.params))
        return metrics

    def close(self):
        self.bar.close()
        self.profiler.close()
        self.batches.close()
        self.checkpointer.close()


def _pretrained_state(config: RunConfig, tx, layout, shardings):
    """The fresh train state around the weights `checkpoint.init_from` names, in the model's
    layer layout and parameter dtype, placed on `shardings`."""
    from lmjax.interop.pretrained import load_weights

    m = config.model
    _, host_params = load_weights(config.checkpoint.init_from, scan_layers=m.scan_layers, param_dtype=m.param_dtype)
    params = layout.put_params(host_params, shardings.params)
    return layout.jit(state_from_params_fn(tx), out_shardings=shardings)(params, jax.random.PRNGKey(config.seed))


def build_run(config: RunConfig, workdir) -> Run:
    """Build (or restore, when `workdir` holds checkpoints) everything a run needs."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / CONFIG_FILE).exists() and (workdir / CHECKPOINTS).exists():
        check_resume_compatible(read_run_config(workdir), config)
    is_lead = jax.process_index() == 0
    write_run_config(workdir, config)
    t = config.train

    task_module = TASKS.get(config.data.name)
    tokenizer_arg = {}
    if getattr(task_module, "USES_PRETRAINED_TOKENIZER", False):  # lmjax.config: then init_from is set
        from lmjax.data.tokenizers import pretrained_tokenizer

        tokenizer_arg["tokenizer"] = pretrained_tokenizer(config.checkpoint.init_from)
    task = task_module.build(
        config.data, workdir=workdir, seq_len=t.seq_len, eval_cfg=config.eval, vocab_size=config.model.vocab_size,
        **tokenizer_arg,
    )
    # Before training: a stop_when on a metric the task never reports would never stop it.
    names = {end: [n for e in task.evaluators if e.at_end == end for n in e.metric_names()] for end in (False, True)}
    check_stop_when_names(t.stop_when, config.data.name, periodic=names[False], at_end=names[True])
    if is_lead and task.tokenizer is not None:
        save_run_tokenizer(workdir, task.tokenizer)
    model = build_model(config.model)
    p = config.parallel
    layout = Layout.from_devices(p.data, p.model, p.fsdp)
    layout.check_rows(t.batch_size, "train.batch_size")
    layout.check_rows(config.eval.batch_size, "eval.batch_size")
    tx, schedule = make_optimizer(config.optim, t.steps)
    init_state = init_state_fn(model, tx, t.seq_len)
    shardings = state_shardings(model, tx, t.seq_len, layout)

    rows = layout.process_rows(t.batch_size)
    batches = InputShards(
        task.train, seq_len=t.seq_len, batch_size=t.batch_size, seed=config.seed, pack=config.data.pack,
        shards=config.data.input_shards or len(layout.row_spans(t.batch_size)), rows=rows,
    )
    c = config.checkpoint
    keep_also = None
    if config.eval.async_tasks:  # a checkpoint outlives checkpoint.keep until the follower evaluated it
        from lmjax.eval.follow import unevaluated

        keep_also = functools.partial(unevaluated, workdir)
    checkpointer = Checkpointer(workdir / CHECKPOINTS, keep=c.keep, async_save=c.async_save, keep_also=keep_also)
    resumed_from = checkpointer.resume_step()  # the newest intact step; damaged newer ones set aside
    if resumed_from is not None:  # state and data position of that one step
        state, data_state = checkpointer.restore(abstract_train_state(init_state, config.seed, shardings), resumed_from)
        batches.set_state(data_state)
    elif config.checkpoint.init_from:  # the weights are read only when the run starts, not when it resumes
        state = _pretrained_state(config, tx, layout, shardings)
    else:
        state = layout.jit(init_state, out_shardings=shardings)(jax.random.PRNGKey(config.seed))

    log = config.logging
    writer = MetricWriter(workdir, log, json.loads(to_json(config)), enabled=is_lead, resume_step=resumed_from)
    # Every packed sequence is one whole example, so attention can skip keys beyond the longest.
    max_segment_len = longest_example(task.train)
    train_step = make_train_step(
        functools.partial(model.apply, max_segment_len=max_segment_len), tx, schedule, config.optim.grad_accum,
        layout=layout, shardings=shardings, probes=log.probes_every > 0,
    )
    env = EvalEnv(model, layout, shardings.params, progress=is_lead and log.progress_bar)
    for evaluator in task.evaluators:
        evaluator.prepare(env)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    if int(state.step) == 0:
        writer.write(0, {"model/params": n_params})
    return Run(
        config=config, workdir=workdir, model=model, layout=layout, tx=tx, schedule=schedule, state=state,
        train_step=train_step, batches=Prefetcher(batches), rows=rows, evaluators=task.evaluators, writer=writer,
        checkpointer=checkpointer,
        profiler=make_profiler(config.implementation.profiler, workdir, start=log.profile_start, stop=log.profile_stop),
        bar=tqdm(total=t.steps, initial=int(state.step), disable=not (is_lead and log.progress_bar), dynamic_ncols=True),
        max_segment_len=max_segment_len, n_params=n_params, resumed_from=resumed_from, is_lead=is_lead,
        step=int(state.step),
    )
