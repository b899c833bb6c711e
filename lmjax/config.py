"""The run config: recipes (ml_collections) in, one checked tree of frozen sections out.

A recipe is a python file whose `get_config()` returns a ConfigDict, started from
`base_recipe(task)` so that every section and key exists (absl's `--config.a.b=v` overrides
need the key to exist) and every default is written once: in the section dataclasses below,
a task's data section (lmjax/tasks/) or a model family's config (lmjax/models/).
`parse_config` checks the resolved ConfigDict once, at the entry point, into a `RunConfig`;
library code then takes its own section (`config.optim`, `config.logging`, ...) or plain
arguments, never the whole config.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from ml_collections import config_dict

from lmjax.registry import ConfigError

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Implementation:
    model: str = "transformer"  # lmjax.models.MODELS
    attention: str = "xla"  # lmjax.models.ATTENTIONS
    profiler: str = "none"  # lmjax.monitor.profiler.PROFILERS


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 0.0  # 0 = no clipping
    schedule: str = "cosine"  # lmjax.optim.schedules.SCHEDULES
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: the final fraction of training that decays
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class Train:
    steps: int = 3000
    batch_size: int = 32
    seq_len: int = 256
    log_every: int = 25
    eval_every: int = 50
    stop_when: str = ""  # e.g. "eval/qa_acc>=0.96"; "" trains every step


@dataclasses.dataclass(frozen=True)
class Eval:
    batch_size: int = 256
    max_batches: int = 8  # text tasks: evenly spaced validation windows, batches of them
    recall: bool = False  # facts: recall by free generation at the end of training
    recall_lanes: int = 64
    recall_chunk: int = 16
    tasks: str = ""  # python -m lmjax.eval's default task list (lmjax.eval.tasks; "" = the run's task's default)
    async_tasks: str = ""  # evaluate every saved checkpoint with these tasks in a separate process ("" = off)


@dataclasses.dataclass(frozen=True)
class Wandb:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "lmjax"
    entity: str = ""
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Logging:
    tensorboard: bool = True
    progress_bar: bool = True
    wandb: Wandb = Wandb()
    count_flops: bool = True  # perf/flops_per_step (compiled + analytic) and perf/mfu
    probes_every: int = 0  # probe/... metrics every N steps (0 = off)
    profile_start: int = 10  # the steps implementation.profiler=trace records
    profile_stop: int = 15


@dataclasses.dataclass(frozen=True)
class Distributed:
    """Multi-host start; empty = from the environment, or a single process."""

    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    init_timeout_s: int = 300
    heartbeat_timeout_s: int = 100


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Devices: data x model (-1 = the rest); fsdp also splits parameters and optimizer state over data."""

    data: int = -1
    model: int = 1
    fsdp: bool = False
    distributed: Distributed = Distributed()


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    every: int = 200
    keep: int = 2
    async_save: bool = True
    # Start from these weights (a GGUF file or a Hugging Face Llama folder, lmjax.interop.pretrained)
    # instead of a random init; the model's shape and tokenizer come from them. "" = random init.
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: int
    implementation: Implementation
    model: Any  # the family's config: TransformerConfig | MambaConfig | RNNConfig
    data: Any  # the task's data section (lmjax/tasks/)
    optim: Optim
    train: Train
    eval: Eval
    logging: Logging
    parallel: Parallel
    checkpoint: Checkpoint

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {
    "implementation": Implementation, "optim": Optim, "train": Train, "eval": Eval, "logging": Logging,
    "parallel": Parallel, "checkpoint": Checkpoint,
}


def base_recipe(task: str) -> config_dict.ConfigDict:
    """Every common section with its defaults, plus `task`'s data section; recipes add `model`
    and override what differs."""
    from lmjax.tasks import TASKS

    c = config_dict.ConfigDict()
    c.seed = 0
    for name, section in SECTIONS.items():
        c[name] = dataclasses.asdict(section())
    c.data = dataclasses.asdict(TASKS.get(task).Section())
    return c


# -- checking -------------------------------------------------------------------------------

def _plain(tree) -> dict:
    if isinstance(tree, config_dict.ConfigDict):
        return tree.to_dict()
    return json.loads(json.dumps(tree)) if not isinstance(tree, dict) else tree


def _build(cls, values: dict, where: str):
    """`cls` from a dict of its fields (nested dataclasses included); unknown keys and wrong
    types are one-line ConfigErrors."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}; valid keys in '{where}': "
            f"{', '.join(sorted(fields))}."
        )
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _typed(value, default, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as error:
        missing = re.findall(r"'(\w+)'", str(error))
        raise ConfigError(f"Missing config key(s) {', '.join(f'{where}.{k}' for k in missing)}.") from None


def _typed(value, default, key):
    """`value` checked against the type of its default (ints are accepted for floats)."""
    if default is dataclasses.MISSING or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be True or False, got {value!r}.")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}.")
        return float(value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be a whole number, got {value!r}.")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}.")
    return value


def _positive(**values):
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:  # NaN too
            raise ConfigError(f"{key} must be a positive number, got {value!r}.")


def _at_least_zero(what="", **values):
    """Each value >= 0 (NaN is not); `what` says what 0 means, e.g. "0 = off"."""
    for key, value in values.items():
        if not value >= 0:
            raise ConfigError(f"{key} must be 0 or more{f' ({what})' if what else ''}, got {value!r}.")


def _in_range(low, high, *, high_open=False, **values):
    """Each value in [low, high] ([low, high) with `high_open`); NaN is not."""
    for key, value in values.items():
        if not (low <= value < high if high_open else low <= value <= high):
            raise ConfigError(f"{key} must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}.")


def parse_config(config) -> RunConfig:
    """Check a resolved config (ConfigDict or plain dict) into a RunConfig; ConfigError names
    the key and the valid choices."""
    from lmjax.models import MODELS, model_config
    from lmjax.tasks import TASKS

    tree = _plain(config)
    if "seed" not in tree:
        raise ConfigError("Missing config key seed.")
    missing = [s for s in ("implementation", "model", "data", *SECTIONS) if s not in tree]
    if missing:
        raise ConfigError(f"The config has no '{missing[0]}' section; every recipe starts from lmjax.config.base_recipe.")
    unknown = sorted(set(tree) - {"seed", "model", "data", *SECTIONS})
    if unknown:
        raise ConfigError(f"Unknown config section(s) {', '.join(unknown)}; valid: {', '.join(sorted(['seed', 'model', 'data', *SECTIONS]))}.")
    sections = {name: _build(cls, tree[name], name) for name, cls in SECTIONS.items()}
    impl = sections["implementation"]
    MODELS.get(impl.model)
    if "name" not in tree["data"]:
        raise ConfigError("Missing config key data.name.")
    task = TASKS.get(tree["data"]["name"])
    model_section = _with_pretrained_shape(tree["model"], sections["checkpoint"].init_from, impl, task)
    run = RunConfig(
        seed=_typed(tree["seed"], 0, "seed"),
        model=model_config(impl, model_section),
        data=_build(task.Section, tree["data"], "data"),
        **sections,
    )
    _check(run)
    task.check(run.data, vocab_size=run.model.vocab_size, seq_len=run.train.seq_len, eval_cfg=run.eval)
    return run


def _with_pretrained_shape(model_section: dict, init_from: str, impl, task) -> dict:
    """The model section, with the shape of the weights `checkpoint.init_from` names filled in;
    a recipe key that contradicts them is a ConfigError. Without init_from: the section as is."""
    takes_tokenizer = getattr(task, "USES_PRETRAINED_TOKENIZER", False)
    if not init_from:
        if takes_tokenizer:
            raise ConfigError(
                f"data.name={task.Section.name} reads text with the tokenizer of the model the run starts from; "
                "set checkpoint.init_from to a GGUF file or a Hugging Face folder."
            )
        return model_section
    if not takes_tokenizer:
        raise ConfigError(
            f"checkpoint.init_from works with data.name=text (the task that uses the imported tokenizer); "
            f"data.name={task.Section.name} makes its own tokenizer."
        )
    if impl.model != "transformer":
        raise ConfigError(f"checkpoint.init_from imports Llama-style weights: implementation.model must be transformer, got {impl.model!r}.")
    from lmjax.interop.pretrained import read_shape

    try:
        shape = read_shape(init_from)
    except (OSError, ValueError) as error:
        raise ConfigError(f"checkpoint.init_from={init_from!r}: {error}") from None
    section = dict(model_section)
    for key, value in shape.items():
        if key in section and section[key] != value:
            raise ConfigError(
                f"model.{key}={section[key]!r} contradicts checkpoint.init_from, whose model has {key}={value!r}; "
                "drop the key (the shape comes from the weights)."
            )
        section[key] = value
    return section


def _check(c: RunConfig):
    from lmjax.models import ATTENTIONS
    from lmjax.monitor.profiler import PROFILERS
    from lmjax.optim.schedules import SCHEDULES

    ATTENTIONS.get(c.implementation.attention)
    PROFILERS.get(c.implementation.profiler)
    t = c.train
    _positive(**{"train.steps": t.steps, "train.batch_size": t.batch_size, "train.seq_len": t.seq_len,
                 "train.log_every": t.log_every, "train.eval_every": t.eval_every, "eval.batch_size": c.eval.batch_size,
                 "eval.max_batches": c.eval.max_batches, "eval.recall_lanes": c.eval.recall_lanes,
                 "eval.recall_chunk": c.eval.recall_chunk, "checkpoint.every": c.checkpoint.every, "checkpoint.keep": c.checkpoint.keep})
    o = c.optim
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"Unknown schedule {o.schedule!r} in optim.schedule; choose one of: {', '.join(sorted(SCHEDULES))}.")
    _positive(**{"optim.lr": o.lr, "optim.eps": o.eps, "optim.grad_accum": o.grad_accum})
    _in_range(0, 1, high_open=True, **{"optim.b1": o.b1, "optim.b2": o.b2})
    _at_least_zero(**{"optim.warmup_steps": o.warmup_steps, "optim.weight_decay": o.weight_decay})
    _at_least_zero("0 = no clipping", **{"optim.clip_norm": o.clip_norm})
    _in_range(0, 1, **{"optim.min_lr_ratio": o.min_lr_ratio, "optim.decay_fraction": o.decay_fraction})
    if t.batch_size % c.optim.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by optim.grad_accum={c.optim.grad_accum}.")
    parse_stop_when(t.stop_when)
    for key in ("param_dtype", "compute_dtype"):
        if getattr(c.model, key) not in DTYPES:
            raise ConfigError(f"Unknown dtype {getattr(c.model, key)!r} in model.{key}; choose one of: {', '.join(DTYPES)}.")
    log = c.logging
    if log.probes_every < 0:
        raise ConfigError(f"logging.probes_every must be a whole number of steps (0 = no probes), got {log.probes_every!r}.")
    if not 0 <= log.profile_start < log.profile_stop:
        raise ConfigError(
            f"logging.profile_start={log.profile_start!r} and logging.profile_stop={log.profile_stop!r} must be steps with start < stop."
        )
    if log.wandb.mode not in ("disabled", "offline", "online"):
        raise ConfigError(f"Unknown logging.wandb.mode {log.wandb.mode!r}; choose one of: disabled, offline, online.")
    for key in ("data", "model"):
        value = getattr(c.parallel, key)
        if value == 0 or value < -1:
            raise ConfigError(f"parallel.{key} must be a positive device count or -1 (the devices left), got {value!r}.")
    for key in ("tasks", "async_tasks"):
        if getattr(c.eval, key):
            check_eval_task_names(getattr(c.eval, key), f"eval.{key}")


def check_eval_task_names(text: str, key: str):
    """A comma-separated list of lmjax.eval.tasks names; ConfigError naming the unknown ones."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ConfigError(f"{key} must be task names separated by commas (e.g. facts_recall,facts_bio), got {text!r}.")
    try:
        from lmjax.eval.tasks import EVAL_TASKS
    except ModuleNotFoundError as error:
        if error.name == "lmjax.eval.tasks":  # an install without the task registry: the eval reports it
            return
        raise
    unknown = [name for name in names if name not in EVAL_TASKS.names()]
    if unknown:
        raise ConfigError(
            f"Unknown eval task(s) {', '.join(map(repr, unknown))} in {key}; choose from: {', '.join(EVAL_TASKS.names())}."
        )


def parse_stop_when(text):
    """'eval/qa_acc>=0.95' -> (name, op, threshold); '' -> None."""
    if not text:
        return None
    for op in (">=", "<="):
        if op in text:
            name, threshold = (part.strip() for part in text.split(op))
            try:
                return name, op, float(threshold)
            except ValueError:
                break
    raise ConfigError(f"train.stop_when must look like 'eval/qa_acc>=0.95' or 'eval/loss<=1.5', got {text!r}.")


def check_stop_when_names(text, task: str, periodic: list, at_end: list = ()):
    """ConfigError unless `train.stop_when` (`text`) names a metric the periodic evaluation
    reports: `periodic` (the task's periodic evaluators' names), or the evaluation step's own
    time/since_start_s; `at_end`: the names the task reports only after training."""
    parsed = parse_stop_when(text)
    if parsed is None or parsed[0] in (*periodic, "time/since_start_s"):
        return
    name, reports = parsed[0], ", ".join(sorted(periodic)) or "nothing"
    if name in at_end:
        raise ConfigError(
            f"train.stop_when names {name!r}, which the {task} task reports only after training; "
            f"it reports every train.eval_every steps: {reports}."
        )
    raise ConfigError(f"train.stop_when names {name!r}, which the {task} task never reports; it reports: {reports}.")


# -- files and the command line ---------------------------------------------------------------

def _section(config, path):
    node = config
    for part in filter(None, path.split(".")):
        node = node[part]
    return node


def check_override_keys(config, argv, flag_name="config"):
    """Raise ConfigError for `--config.a.b=v` arguments whose key path is not in `config`."""
    pattern = re.compile(rf"^--{flag_name}\.([A-Za-z0-9_.]+)(=|$)")
    for arg in argv:
        match = pattern.match(arg)
        if not match:
            continue
        node, walked = config, []
        for part in match.group(1).split("."):
            if not isinstance(node, config_dict.ConfigDict) or part not in node:
                where = ".".join(walked) or "the config"
                valid = ", ".join(sorted(node.keys())) if isinstance(node, config_dict.ConfigDict) else "(none)"
                raise ConfigError(f"Unknown config key '{match.group(1)}': no '{part}' in {where}; valid keys: {valid}.")
            node = node[part]
            walked.append(part)


def load_config_file(path, overrides=()):
    """Load a recipe the way the command line does (used by tests and grids): a ConfigDict."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lmjax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides:
        parent, _, leaf = key.rpartition(".")
        node = _section(config, parent)
        if leaf not in node:
            raise ConfigError(f"Unknown config key '{key}'; valid keys in '{parent}': {', '.join(sorted(node.keys()))}.")
        node[leaf] = value
    return config


def to_json(config: RunConfig) -> str:
    """config.json: the checked config, every default filled in."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> RunConfig:
    """A run's config.json back into a RunConfig (keys added since it was written take their defaults)."""
    tree = json.loads(text)
    tree["model"] = {k: v for k, v in tree.get("model", {}).items() if k != "attention"}
    return parse_config(tree)


# Keys that may change when a workdir is resumed; anything else would silently mix two runs.
# `parallel` may change: checkpoints restore onto any mesh. `model.attention_block` computes the
# same attention (only the f32 summation order differs), and runs saved before it existed lack it.
# `eval.tasks` and `eval.async_tasks` only say what evaluates the saved checkpoints, outside training.
RESUMABLE_CHANGES = (
    "logging", "checkpoint", "parallel", "train.steps", "train.stop_when", "train.log_every", "train.eval_every",
    "model.attention_block", "eval.async_tasks", "eval.tasks",
)


def check_resume_compatible(saved: RunConfig, config: RunConfig) -> None:
    """Raise ConfigError if resuming a workdir saved with `saved` under `config` would mix runs."""
    from flax import traverse_util

    old, new = (traverse_util.flatten_dict(json.loads(to_json(c)), sep=".") for c in (saved, config))
    changed = sorted(
        key for key in old.keys() | new.keys()
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)
    )
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:5])
        raise ConfigError(
            f"The workdir holds a run with a different config: {shown}; "
            f"use a new --workdir, or rerun with the saved values."
        )
