"""Loading and validating ml_collections configs.

Configs are python files with `get_config()` (see configs/). Command-line overrides go through
absl's config flags (`--config.model.dim=64`); `check_override_keys` turns a misspelt key into a
one-line error that lists the valid keys, before absl would raise a traceback.
"""
import json
import re

from ml_collections import config_dict

from lmjax.registry import ConfigError

REQUIRED = {
    "": ("seed", "implementation", "model", "data", "optim", "train", "eval", "logging", "checkpoint"),
    "implementation": ("model", "attention", "profiler"),
    "model": ("dim", "n_layers", "vocab_size"),  # + TRANSFORMER_REQUIRED for transformers
    "data": ("name",),
    "optim": ("lr", "weight_decay", "clip_norm", "schedule", "warmup_steps", "grad_accum"),
    "train": ("steps", "batch_size", "seq_len", "log_every", "eval_every"),
    "checkpoint": ("every", "keep"),
}
TRANSFORMER_REQUIRED = ("n_heads", "n_kv_heads")
DTYPES = ("float32", "bfloat16")


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


def _positive(config, *keys):
    for key in keys:
        value = _section(config, key)
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}.")


def validate(config):
    """Check a resolved config; raise ConfigError naming the key and the valid choices."""
    from lmjax.data.datasets import DATASETS
    from lmjax.models import ATTENTIONS, MODELS
    from lmjax.models.transformer import REMAT_POLICIES
    from lmjax.monitor.profiler import PROFILERS
    from lmjax.train.schedules import SCHEDULES

    for section, keys in REQUIRED.items():
        try:
            node = _section(config, section)
        except KeyError:
            raise ConfigError(f"The config has no '{section}' section; every recipe needs one.") from None
        missing = [k for k in keys if k not in node]
        if missing:
            raise ConfigError(f"Missing config key(s) {', '.join(f'{section}.{k}'.lstrip('.') for k in missing)}.")
    build = MODELS.get(config.implementation.model)
    is_transformer = config.implementation.model == "transformer"
    missing = [k for k in TRANSFORMER_REQUIRED if is_transformer and k not in config.model]
    if missing:
        raise ConfigError(f"Missing config key(s) {', '.join('model.' + k for k in missing)}.")
    ATTENTIONS.get(config.implementation.attention)
    PROFILERS.get(config.implementation.profiler)
    _validate_monitoring(config.logging)
    DATASETS.get(config.data.name).validate(config)
    if config.optim.schedule not in SCHEDULES:
        raise ConfigError(
            f"Unknown schedule {config.optim.schedule!r} in optim.schedule; choose one of: {', '.join(sorted(SCHEDULES))}."
        )
    _positive(config, "model.dim", "model.n_layers", "model.vocab_size")
    _positive(config, "train.steps", "train.batch_size", "train.seq_len", "train.log_every", "train.eval_every")
    _positive(config, "optim.lr", "optim.grad_accum", "checkpoint.every", "checkpoint.keep")
    m = config.model
    if is_transformer:
        _positive(config, "model.n_heads", "model.n_kv_heads")
        if m.dim % m.n_heads or (m.dim // m.n_heads) % 2:
            raise ConfigError(f"model.dim={m.dim} must split into model.n_heads={m.n_heads} heads of even size (RoPE).")
        if m.n_heads % m.n_kv_heads:
            raise ConfigError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}.")
    else:
        build(config)  # recurrent families check their own keys (model.scan, model.cell, ...)
    for key in ("model.param_dtype", "model.compute_dtype"):
        if _section(config, key) not in DTYPES:
            raise ConfigError(f"Unknown dtype {_section(config, key)!r} in {key}; choose one of: {', '.join(DTYPES)}.")
    if config.train.batch_size % config.optim.grad_accum:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} must be divisible by optim.grad_accum={config.optim.grad_accum}."
        )
    if m.get("remat", "none") not in REMAT_POLICIES:
        raise ConfigError(f"Unknown remat policy {m.remat!r} in model.remat; choose one of: {', '.join(REMAT_POLICIES)}.")
    if m.get("init", "normal") not in ("normal", "fan_in"):
        raise ConfigError(f"Unknown init scheme {m.init!r} in model.init; choose one of: fan_in, normal.")
    if "parallel" in config:
        _validate_parallel(config.parallel)
    wandb_mode = config.logging.wandb.mode
    if wandb_mode not in ("disabled", "offline", "online"):
        raise ConfigError(f"Unknown logging.wandb.mode {wandb_mode!r}; choose one of: disabled, offline, online.")


def _validate_monitoring(logging):
    probes_every = logging.get("probes_every", 0)
    if not isinstance(probes_every, int) or probes_every < 0:
        raise ConfigError(f"logging.probes_every must be a whole number of steps (0 = no probes), got {probes_every!r}.")
    start, stop = logging.get("profile_start", 10), logging.get("profile_stop", 15)
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop):
        raise ConfigError(
            f"logging.profile_start={start!r} and logging.profile_stop={stop!r} must be steps with start < stop."
        )


def _validate_parallel(p):
    for key in ("data", "model"):
        if not isinstance(p[key], int) or p[key] == 0 or p[key] < -1:
            raise ConfigError(f"parallel.{key} must be a positive device count or -1 (the devices left), got {p[key]!r}.")
    if not isinstance(p.get("fsdp", False), bool):
        raise ConfigError(f"parallel.fsdp must be True or False, got {p.fsdp!r}.")


def load_config_file(path, overrides=()):
    """Load a config file the way the command line does (used by tests and grids)."""
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


def to_json(config) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


# Keys that may change when a workdir is resumed; anything else would silently mix two runs.
# `parallel` may change: checkpoints restore onto any mesh. `model.attention_block` computes the
# same attention (only the f32 summation order differs), and runs saved before it existed lack it.
RESUMABLE_CHANGES = (
    "logging", "checkpoint", "parallel", "train.steps", "train.stop_when", "train.log_every", "train.eval_every",
    "model.attention_block",
)


def _flat(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat(value, path + ".")
        else:
            yield path, value


def check_resume_compatible(saved: dict, config) -> None:
    """Raise ConfigError if resuming a workdir saved with `saved` under `config` would mix runs."""
    old, new = dict(_flat(saved)), dict(_flat(config.to_dict()))
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
