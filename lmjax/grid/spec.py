"""A grid file -> the runs it describes: labels, overrides, names, commands, all validated up front.

A grid file is a Python file whose `get_grid()` returns a dict (see README, "Grids"):
`name`, `config` (base recipe), `root` (where run folders go), `fixed` (overrides for every run),
`axes` (a cartesian product, in order: a config key -> values, or a label -> overrides bundle),
`seeds`, `derive` (more overrides computed from a run's overrides) and `where` (a filter on labels).
"""
import dataclasses
import importlib.util
import itertools
import re
import sys
from pathlib import Path

from lmjax.registry import ConfigError

GRID_KEYS = ("name", "config", "root", "fixed", "axes", "seeds", "derive", "where")
SCALARS = (bool, int, float, str)


class GridError(ValueError):
    """A mistake in the grid file itself: reported as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # the run folder's name, built from the labels
    labels: dict  # axis name -> value (or bundle label), plus "seed"
    overrides: dict  # config key -> value: fixed, then axes, then seed, then derive
    workdir: Path
    command: list  # argv of `python -m lmjax.main` for this run
    steps: int  # train.steps once overridden (the progress table's denominator)
    async_eval: str = ""  # eval.async_tasks once overridden ("" = no asynchronous evaluation)


@dataclasses.dataclass(frozen=True)
class Grid:
    name: str
    path: Path  # the grid file
    config: Path  # the base recipe
    root: Path  # run folders are root/<run name>
    runs: list


def load_grid(path, root=None) -> Grid:
    """Read a grid file and expand it; GridError for a malformed grid, ConfigError for a bad override."""
    from lmjax.config import load_config_file

    path = Path(path)
    spec = _read_grid_file(path)
    name = spec.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise GridError(f"{path}: 'name' must be a non-empty string, got {name!r}.")
    config = _find_config(spec, path)
    root = Path(root if root is not None else spec.get("root", Path("runs") / name)).absolute()
    base = load_config_file(config)
    runs = [
        _make_run(labels, overrides, config, root, base)
        for labels, overrides in _expand(spec, path, base)
    ]
    if not runs:
        raise GridError(f"{path}: the grid has no runs ('where' filtered out every combination).")
    _check_unique(runs, path)
    return Grid(name=name, path=path.absolute(), config=config, root=root, runs=runs)


# --- reading the grid file -------------------------------------------------------------------


def _read_grid_file(path):
    if not path.is_file():
        raise GridError(f"Grid file {str(path)!r} does not exist.")
    module_spec = importlib.util.spec_from_file_location("lmjax_user_grid", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # an error in the user's code is a traceback: it is a bug there
    if not hasattr(module, "get_grid"):
        raise GridError(f"{path} has no get_grid() function; it should return dict(config=..., axes=...).")
    spec = module.get_grid()
    if not isinstance(spec, dict):
        raise GridError(f"{path}: get_grid() must return a dict, got {type(spec).__name__}.")
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"{path}: unknown grid key(s) {', '.join(unknown)}; valid keys: {', '.join(GRID_KEYS)}.")
    for key in ("derive", "where"):
        if spec.get(key) is not None and not callable(spec[key]):
            raise GridError(f"{path}: '{key}' must be a function, got {type(spec[key]).__name__}.")
    return spec


def _find_config(spec, grid_path):
    """The base recipe, relative to the current folder or else to the grid file's folder."""
    if "config" not in spec:
        raise GridError(f"{grid_path}: the grid has no 'config' (the base recipe, e.g. config='configs/facts.py').")
    given = Path(spec["config"])
    for candidate in (given, grid_path.parent / given):
        if candidate.is_file():
            return candidate.absolute()
    raise GridError(
        f"{grid_path}: config {str(given)!r} not found in the current folder nor in {str(grid_path.parent)!r}."
    )


def _axis_choices(axes, grid_path):
    """[(axis name, [(label, overrides bundle), ...]), ...] in the grid's order."""
    if not isinstance(axes, dict):
        raise GridError(f"{grid_path}: 'axes' must be a dict of axis name -> values, got {type(axes).__name__}.")
    choices = []
    for axis, values in axes.items():
        if isinstance(values, dict):  # labelled axis: label -> bundle of overrides
            bundles = list(values.items())
            for label, bundle in bundles:
                if not isinstance(label, SCALARS) or not isinstance(bundle, dict):
                    raise GridError(f"{grid_path}: axis '{axis}' must map labels to dicts of overrides, got {label!r}: {bundle!r}.")
        elif isinstance(values, (list, tuple, range)):
            bundles = [(value, {axis: value}) for value in values]
        else:
            raise GridError(f"{grid_path}: axis '{axis}' must be a list of values or a dict of label -> overrides.")
        if not bundles:
            raise GridError(f"{grid_path}: axis '{axis}' is empty; give it at least one value.")
        choices.append((axis, bundles))
    return choices


def _expand(spec, grid_path, base):
    """Yield (labels, overrides) for every combination the grid keeps."""
    fixed = spec.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise GridError(f"{grid_path}: 'fixed' must be a dict of config key -> value.")
    choices = _axis_choices(spec.get("axes") or {}, grid_path)
    seeds = spec.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, (list, tuple, range)) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise GridError(f"{grid_path}: 'seeds' must be a non-empty list of integers, got {seeds!r}.")
        if any(axis == "seed" for axis, _ in choices):
            raise GridError(f"{grid_path}: 'seed' is both an axis and 'seeds'; keep one.")
    seed_choices = list(seeds) if seeds is not None else [None]
    where, derive = spec.get("where"), spec.get("derive")
    for combo in itertools.product(*(bundles for _, bundles in choices), seed_choices):
        *picked, seed = combo
        labels = {axis: label for (axis, _), (label, _) in zip(choices, picked)}
        if "seed" not in labels:
            labels["seed"] = seed if seed is not None else base.get("seed")
        if where is not None and not _call(where, dict(labels), "where", labels):
            continue
        overrides = dict(fixed)
        for _, bundle in picked:
            overrides.update(bundle)
        if seed is not None:
            overrides["seed"] = seed
        if derive is not None:
            derived = _call(derive, _WithBase(overrides, base), "derive", labels)
            if not isinstance(derived, dict):
                raise GridError(f"{grid_path}: derive must return a dict of overrides, got {type(derived).__name__}.")
            overrides.update(derived)
        yield labels, overrides


def _call(function, argument, what, labels):
    try:
        return function(argument)
    except Exception as error:  # noqa: BLE001 - the user's lambda: say which run it failed on
        raise GridError(f"'{what}' failed for labels {labels}: {type(error).__name__}: {error}") from None


class _WithBase(dict):
    """A run's overrides, falling back to the base config for keys the grid does not set (for derive)."""

    def __init__(self, overrides, base):
        super().__init__(overrides)
        self._base = base

    def __missing__(self, key):
        node = self._base
        for part in key.split("."):
            node = node[part]  # KeyError names the missing part
        return node

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default


# --- one run ---------------------------------------------------------------------------------


def _make_run(labels, overrides, config_path, root, base):
    name = run_name(labels)
    for key, value in overrides.items():
        if not isinstance(key, str) or not isinstance(value, SCALARS + (tuple, list)):
            raise GridError(
                f"run '{name}': override {key!r}={value!r} must be a dotted config key set to a "
                f"bool, int, float, str or tuple."
            )
    config = _validated_config(name, overrides, config_path, base)
    workdir = root / name
    command = [
        sys.executable, "-m", "lmjax.main", f"--config={config_path}",
        *(f"--config.{key}={format_value(value)}" for key, value in overrides.items()),
        f"--workdir={workdir}",
    ]
    return Run(name=name, labels=labels, overrides=overrides, workdir=workdir, command=command, steps=int(config.train.steps),
               async_eval=config.eval.async_tasks)


def _validated_config(name, overrides, config_path, base):
    """The run's resolved config, or a one-line ConfigError naming the run and the key."""
    from lmjax.config import check_override_keys, load_config_file, parse_config

    try:
        check_override_keys(base, [f"--config.{key}" for key in overrides])
        return parse_config(load_config_file(config_path, overrides.items()))
    except ConfigError as error:
        raise ConfigError(f"run '{name}': {error}") from None
    except (TypeError, ValueError) as error:  # ConfigDict refuses a value of the wrong type
        for key, value in overrides.items():
            try:
                load_config_file(config_path, [(key, value)])
            except (TypeError, ValueError):
                held = _lookup(base, key)
                raise ConfigError(
                    f"run '{name}': {key}={value!r} is a {type(value).__name__} but the config holds a "
                    f"{type(held).__name__} ({held!r})."
                ) from None
        raise ConfigError(f"run '{name}': {error}") from None


def _lookup(config, key):
    for part in key.split("."):
        config = config[part]
    return config


def format_value(value) -> str:
    """A value as absl's config flags read it back to the same type (the parser follows the field's type)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)  # int; str raw, "" included (`--config.train.stop_when=`)


_UNSAFE = re.compile(r"[^A-Za-z0-9._+\-]")


def run_name(labels) -> str:
    """`num_people=64,dim=16,mode=weights,seed=0`: short keys (last dotted part unless ambiguous), safe values."""
    shorts = [key.rsplit(".", 1)[-1] for key in labels]
    parts = []
    for key, short, value in zip(labels, shorts, labels.values()):
        shown = key if shorts.count(short) > 1 else short
        text = format_value(value) if value != "" else "empty"
        parts.append(f"{_UNSAFE.sub('_', shown)}={_UNSAFE.sub('_', text)}")
    return ",".join(parts)


def _check_unique(runs, grid_path):
    seen = {}
    for run in runs:
        if run.name in seen:
            raise GridError(
                f"{grid_path}: runs {seen[run.name]} and {run.labels} both get the folder name '{run.name}'; "
                f"make their labels differ by more than punctuation."
            )
        seen[run.name] = run.labels
