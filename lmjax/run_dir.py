"""A training run's folder, written by the trainer and read by everything that comes after it.

    WORKDIR/config.json      the resolved config          write_run_config / read_run_config
    WORKDIR/checkpoints/     orbax: train state + each process's data position        Checkpointer
                             + lmjax_checksums.json in each step (sizes and sha256 of its files)
    WORKDIR/tokenizer.json   the tokenizer the run trained with   save_run_tokenizer / run_tokenizer
    WORKDIR/data/            the facts data (or data.cache_dir)                    facts_data_dir

Generation, recall and export load a run from here without the trainer (nothing here imports
lmjax.train): the parameters alone (`restore_params`: no optimizer built, no optimizer moments
read), the tokenizer and the facts data folder (`run_task`), without building the dataset.
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINTS = "checkpoints"


class CheckpointError(ValueError):
    """A run's checkpoints cannot be used as asked (damaged, or written by another process
    count): a user error, reported in one line with exit status 2."""


def _write_atomically(path: Path, text: str):
    """Process 0 writes `text` under a temporary name, then renames it: readers never see half
    a file, and in a multi-host run the processes do not race on one file."""
    if jax.process_index() != 0:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- config.json ---------------------------------------------------------------------------------

def write_run_config(workdir, config):
    """WORKDIR/config.json: the resolved config (process 0 writes, atomically)."""
    from lmjax.config import to_json

    _write_atomically(Path(workdir) / CONFIG_FILE, to_json(config))


def read_run_config(workdir):
    """The config a run was trained with; the one place that reads config.json."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{str(workdir)!r} has no {CONFIG_FILE}; point --workdir at a training run folder.")
    from lmjax.config import from_json

    return from_json(path.read_text())


def run_model(config):
    """The flax module a run's config describes."""
    from lmjax.models import build_model

    return build_model(config.model)


# -- checkpoints -----------------------------------------------------------------------------------

class _DataPosition:
    """A snapshot of an iterator position in the shape grain's handler saves and restores."""

    def __init__(self, state=None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes):
        self.state = json.loads(state)

    def start_prefetch(self):  # part of the handler's protocol; nothing runs ahead here
        pass


# -- damaged checkpoints ----------------------------------------------------------------------------
#
# orbax commits a step atomically: it writes into `STEP.orbax-checkpoint-tmp-*`, puts
# `commit_success.txt` in it, then renames it to `STEP` (on a local disk; on GCS the marker alone
# commits it). Nothing checks a committed step again: a file truncated, deleted or altered since
# (a full disk, a partial copy, bit rot) ends in a traceback at restore, or for flipped bytes in
# silently different numbers. So lmjax seals each step once orbax has finished it: process 0 writes
# `STEP/lmjax_checksums.json`, the size and sha256 of every file of the step, and every restore
# checks the step against it first. Steps saved before this existed (no checksums file) are
# trusted as orbax committed them.

COMMIT_MARKER = "commit_success.txt"  # orbax's commit marker (atomicity_types.COMMIT_SUCCESS_FILE)
CHECKSUMS_FILE = "lmjax_checksums.json"
CHECKSUMS_FORMAT = "lmjax.checksums/1"
DAMAGED_SUFFIX = ".damaged"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _digests(root: Path, names) -> dict:
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda name: _sha256(root / name), names)))


def write_checksums(step_dir):
    """Seal a finished step: STEPDIR/lmjax_checksums.json holds the size and sha256 of each of its
    files (written under a temporary name, then renamed)."""
    step_dir = Path(step_dir)
    tmp = step_dir / f".{CHECKSUMS_FILE}.tmp"
    names = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file() and p.name not in (CHECKSUMS_FILE, tmp.name))
    digests = _digests(step_dir, names)
    files = {name: {"bytes": (step_dir / name).stat().st_size, "sha256": digests[name]} for name in names}
    tmp.write_text(json.dumps({"format": CHECKSUMS_FORMAT, "files": files}, indent=1) + "\n")
    os.replace(tmp, step_dir / CHECKSUMS_FILE)


def checkpoint_damage(step_dir):
    """Why the step in `step_dir` cannot be restored as saved (one phrase naming the file, its
    path relative to the run folder), or None when it is intact. Reads every file of a sealed step."""
    step_dir = Path(step_dir)
    shown = lambda name: (Path(step_dir.parent.name) / step_dir.name / name).as_posix()  # noqa: E731
    if not (step_dir / COMMIT_MARKER).is_file():
        return f"{shown(COMMIT_MARKER)} is missing: its save never finished"
    if not (step_dir / CHECKSUMS_FILE).exists():
        return None  # saved before lmjax sealed steps: trusted as orbax committed it
    try:
        saved = json.loads((step_dir / CHECKSUMS_FILE).read_text())
        files = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in saved["files"].items()}
        if saved["format"] != CHECKSUMS_FORMAT:
            raise ValueError(f"format {saved['format']!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{shown(CHECKSUMS_FILE)} is unreadable ({type(error).__name__}: {error})"
    for name, (size, _) in files.items():  # the cheap checks first: a missing or cut file
        path = step_dir / name
        if not path.is_file():
            return f"{shown(name)} is missing"
        if path.stat().st_size != size:
            return f"{shown(name)} has {path.stat().st_size:,} of {size:,} bytes"
    digests = _digests(step_dir, sorted(files))
    for name in sorted(files):
        if digests[name] != files[name][1]:
            return f"{shown(name)} does not match its sha256: its bytes changed since the save"
    return None


def newest_intact_step(directory, steps, wanted=None):
    """(step, damaged): checkpoint `wanted`, or without it the newest of `steps` that is intact
    (None if none is), and [(step, why)] of the newer ones found damaged. A damaged `wanted`
    step, or damaged steps and none intact, is a ValueError of one line saying what to do."""
    directory = Path(directory)
    if wanted is not None:
        why = checkpoint_damage(directory / str(wanted))
        if why:
            raise CheckpointError(
                f"Checkpoint {wanted} of {str(directory.parent)!r} is damaged ({why}); pick another --step "
                f"(saved: {', '.join(map(str, sorted(steps)))}) or leave --step out for the newest intact one."
            )
        return wanted, []
    damaged = []
    for step in sorted(steps, reverse=True):
        why = checkpoint_damage(directory / str(step))
        if why is None:
            return step, damaged
        damaged.append((step, why))
    if damaged:
        listed = "; ".join(f"{step}: {why}" for step, why in damaged)
        raise CheckpointError(
            f"Every checkpoint of {str(directory.parent)!r} is damaged ({listed}); restore {directory.name}/ "
            f"from a copy, or move it away to start the run over."
        )
    return None, []


def warn(message: str):
    print(f"lmjax: warning: {message}", file=sys.stderr, flush=True)


class _KeepPinned:
    """An orbax preservation policy: keep the steps `keep_also` held for when the save began. Every
    process must decide alike (orbax keeps its list of steps on each), so process 0 asks and
    broadcasts its answer."""

    def __init__(self, keep_also):
        self.keep_also, self.steps = keep_also, frozenset()

    def update(self, saved_steps):
        steps = [s for s in saved_steps if self.keep_also(s)] if jax.process_index() == 0 else []
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
            padded = np.zeros(n, np.int32)
            padded[: len(steps)] = steps
            steps = multihost_utils.broadcast_one_to_all(padded).tolist()
        self.steps = frozenset(int(s) for s in steps)

    def should_preserve(self, checkpoints, *, context):
        return [info.step in self.steps for info in checkpoints]


class Checkpointer:
    """orbax checkpoints: the train state (params, optimizer, step, PRNG) plus the data position.

    The train state is saved sharded (every process writes its own shards) and restored onto the
    shardings of whatever abstract state is passed: another mesh, or one device. Each process's
    data position goes to its own file (grain's per-process checkpoint handler), since in a
    multi-host run every process reads different input shards. Each step is sealed with its
    checksums once orbax has finished it (sync: at once; async: at the next save, wait or close),
    and checked before it is restored.
    """

    def __init__(self, directory, *, keep: int, async_save: bool = True, keep_also=None):
        """`keep`: the newest steps kept (older ones are deleted after each save); `keep_also(step)
        -> bool`: steps kept beyond those while it holds (asynchronous evaluation: a step not yet
        evaluated), asked again at every save on process 0."""
        self._pinned = None if keep_also is None else _KeepPinned(keep_also)
        if self._pinned is None:
            retention = {"max_to_keep": keep}
        else:  # orbax: a preservation policy replaces max_to_keep
            policies = [ocp.checkpoint_managers.LatestN(n=keep), self._pinned]
            retention = {"preservation_policy": ocp.checkpoint_managers.AnyPreservationPolicy(policies)}
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, create=True, **retention)
        self.directory = Path(directory).absolute()
        self.async_save = async_save
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._unsealed = []  # steps saved by this process whose save may still be running
        self._intact = set()  # steps checked (or, off process 0, that process 0 checked)

    def latest_step(self):
        return self.manager.latest_step()

    def resume_step(self):
        """The step training resumes from: the newest intact one (None: no checkpoint yet). Process 0
        checks; each damaged newer step is renamed STEP.damaged, so that training may save that
        step again, with one warning line; no intact step left is a ValueError."""
        if jax.process_index() == 0:
            step, damaged = newest_intact_step(self.directory, self.manager.all_steps())
            for bad, why in damaged:
                aside = self._set_aside(bad)
                warn(f"checkpoint {bad} is damaged ({why}); set aside as {aside}; resuming from step {step}.")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("lmjax: damaged checkpoints set aside")
        self.manager.reload()
        step = self.latest_step()
        self._intact.add(step)  # checked by process 0
        return step

    def _set_aside(self, step) -> str:
        source = self.directory / str(step)
        target, n = source.with_name(f"{step}{DAMAGED_SUFFIX}"), 1
        while target.exists():
            n += 1
            target = source.with_name(f"{step}{DAMAGED_SUFFIX}-{n}")
        os.replace(source, target)
        return f"{self.directory.name}/{target.name}"

    def _checked_step(self, step):
        """`step`, checked (a damaged one is a ValueError), or the newest intact step when None."""
        if step is not None and step in self._intact:
            return step
        chosen, damaged = newest_intact_step(self.directory, self.manager.all_steps(), step)
        for bad, why in damaged:
            warn(f"checkpoint {bad} is damaged ({why}); using step {chosen}.")
        self._intact.add(chosen)
        return chosen

    def save(self, step: int, state, data_state: dict, *, wait: bool = False):
        self._seal_finished()  # orbax's save waits for the previous one anyway
        if self._pinned is not None:
            self._pinned.update(self.manager.all_steps())
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_DataPosition(data_state))
            ),
            force=True,
        )
        self._unsealed.append(step)
        if wait or not self.async_save:
            self._seal_finished()

    def _seal_finished(self):
        """Wait for the running save, then write the checksums of the steps it finished."""
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unsealed:
                if (self.directory / str(step)).is_dir():  # not deleted since (checkpoint.keep)
                    write_checksums(self.directory / str(step))
        self._unsealed = []

    def restore(self, abstract_state, step=None, *, data=True):
        """(state, data_state) at `step` (default: the newest intact one), laid out like
        `abstract_state` (shapes, dtypes and shardings). `data=False` skips the data position
        (data_state None). A damaged `step` is a ValueError."""
        self._seal_finished()
        step = self._checked_step(step)
        if step is None:
            raise ValueError(f"{str(self.directory)!r} holds no checkpoint to restore.")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        position = _DataPosition()
        if data:
            items["data"] = grain.checkpoint.CheckpointRestore(position)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as error:
            if "process_" in str(error) and "does not exist" in str(error):
                raise CheckpointError(
                    f"Checkpoint {step} holds no data position for this process ({error}); it was written "
                    f"by a different number of processes. Resume with the same process count."
                ) from None
            raise
        return restored["state"], position.state

    def restore_params(self, abstract_params, step=None):
        """`state.params` alone at `step` (default: the newest intact one), laid out like
        `abstract_params` (see `read_params`)."""
        self._seal_finished()
        return read_params(self.directory, abstract_params, self._checked_step(step))

    def close(self):
        self._seal_finished()
        self.manager.close()


def _reader(directory):
    """A manager of a checkpoints folder for reading only (it creates nothing and is never asked
    to save or delete; orbax's read_only option would only add a warning on stderr), apart from
    the trainer's, whose "state" item is registered for whole-state saves and restores."""
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def read_params(directory, abstract_params, step: int):
    """`state.params` of checkpoint `step` in `directory`, laid out like `abstract_params`
    (shapes, dtypes, shardings): an orbax partial restore, so the optimizer state, the step, the
    PRNG key and the data position are never read, nor need an optimizer to describe them."""
    reader = _reader(directory)
    try:
        return _params_at(reader, abstract_params, step)
    finally:
        reader.close()


def _params_at(manager, abstract_params, step):
    item = {"params": abstract_params}
    params_only = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    return manager.restore(step, args=ocp.args.Composite(state=params_only))["state"]["params"]


def abstract_params(model, seq_len: int, layout=None):
    """Shapes, dtypes and shardings of the model's (unboxed) parameters: on the first device, or
    on `layout`'s mesh through the parameters' logical axis names."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32)))["params"]
    shapes = nn.meta.unbox(boxed)
    if layout is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, shapes)
    else:
        shardings = layout.param_shardings(boxed)
    return jax.tree_util.tree_map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes, shardings
    )


def restore_params(workdir, step=None, layout=None):
    """(config, model, params, step) at checkpoint `step` (default: the newest intact one, with a
    warning line for each newer damaged one); the parameters on the first device, or sharded on
    `layout`'s mesh (whatever mesh the run trained on). A damaged `step` is a ValueError."""
    workdir = Path(workdir)
    config = read_run_config(workdir)
    no_checkpoint = f"{str(workdir)!r} has no checkpoint yet; train first (python -m lmjax.main ...)."
    if not (workdir / CHECKPOINTS).is_dir():
        raise ValueError(no_checkpoint)
    reader = _reader(workdir / CHECKPOINTS)
    try:
        steps = sorted(reader.all_steps())
        if not steps:
            raise ValueError(no_checkpoint)
        if step is not None and step not in steps:
            raise ValueError(f"No checkpoint at step {step} in {str(workdir)!r}; saved steps: {', '.join(map(str, steps))}.")
        step, damaged = newest_intact_step(workdir / CHECKPOINTS, steps, step)
        for bad, why in damaged:
            warn(f"checkpoint {bad} is damaged ({why}); using step {step}.")
        model = run_model(config)
        params = _params_at(reader, abstract_params(model, config.train.seq_len, layout), step)
    finally:
        reader.close()
    return config, model, params, step


# -- tokenizer -------------------------------------------------------------------------------------

def save_run_tokenizer(workdir, tokenizer):
    """WORKDIR/tokenizer.json, so that generation needs neither the dataset nor its text to
    rebuild the tokenizer (process 0 writes, atomically). `None` (plain ids) writes nothing.
    Any tokenizer of `lmjax.data.tokenizers` (byte, char, sentencepiece, bpe) can be saved."""
    if tokenizer is None or jax.process_index() != 0:
        return
    from lmjax.data.tokenizers import save_tokenizer

    if not callable(getattr(tokenizer, "to_dict", None)):
        raise TypeError(f"save_run_tokenizer does not know how to save a {type(tokenizer).__name__} (it has no to_dict).")
    save_tokenizer(Path(workdir) / TOKENIZER_FILE, tokenizer)


def _tokenizer_from_file(path: Path):
    from lmjax.data.tokenizers import load_tokenizer

    return load_tokenizer(path)


def _facts_tokenizer():
    from lmjax.data.tokenizers.byte import ByteTokenizer

    return ByteTokenizer()


def _shakespeare_tokenizer():  # runs saved before tokenizer.json: the character set of the whole text
    from lmjax.data import shakespeare

    return shakespeare.CharTokenizer.from_text(shakespeare.load_text())


# data.name -> the tokenizer its runs train with, for runs without a tokenizer.json.
DEFAULT_TOKENIZERS = {"facts": _facts_tokenizer, "mqar": lambda: None, "shakespeare": _shakespeare_tokenizer}


def run_tokenizer(config, workdir):
    """The tokenizer a run trained with (None: plain ids, MQAR), without building its dataset."""
    path = Path(workdir) / TOKENIZER_FILE
    if path.is_file():
        return _tokenizer_from_file(path)
    name = config.data.name
    if name not in DEFAULT_TOKENIZERS:
        raise ValueError(f"Unknown data.name {name!r} in {str(workdir)!r}; choose one of: {', '.join(sorted(DEFAULT_TOKENIZERS))}.")
    return DEFAULT_TOKENIZERS[name]()


# -- facts data ------------------------------------------------------------------------------------

def facts_data_dir(config, workdir) -> Path:
    """Where a facts run's data lives (its database, dialogs and recall sets): under
    data.cache_dir, or WORKDIR/data. Computed from the config; nothing is generated."""
    from lmjax.tasks import facts

    return facts.data_folder(config.data, workdir)


def facts_recall_sets(config, workdir) -> dict:
    """Recall set name -> dialog file: the trained questions, and in-tool the unseen people's."""
    from lmjax.tasks import facts

    return {name: str(path) for name, path in facts.recall_files(config.data, facts_data_dir(config, workdir)).items()}


def require_facts_data(config, workdir) -> Path:
    """The facts data folder; FileNotFoundError, with the command that regenerates it, when it
    was deleted."""
    folder = facts_data_dir(config, workdir)
    if not (folder / "meta.json").is_file():
        d = config.data
        raise FileNotFoundError(
            f"The facts data of {str(workdir)!r} is missing ({str(folder)!r}); regenerate it with: python -m "
            f"lmjax.data.facts --out {shlex.quote(str(folder))} --num_people {d.num_people} --seed {d.seed} --num_unseen {d.num_unseen} --alpha {d.alpha}"
        )
    return folder


# -- what generation and evaluation need of a run's task --------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunTask:
    """A run's task without its examples: `name` (data.name), the tokenizer (None: plain ids) and
    `info` (facts: `data_dir` and `recall_sets`, the files recall reads; empty otherwise)."""

    name: str
    tokenizer: Any
    info: dict


def run_task(config, workdir) -> RunTask:
    name = config.data.name
    info = {}
    if name == "facts":
        info = {"data_dir": str(facts_data_dir(config, workdir)), "recall_sets": facts_recall_sets(config, workdir)}
    return RunTask(name, run_tokenizer(config, workdir), info)
