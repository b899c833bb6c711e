"""A training run's folder, written by the trainer and read by everything that comes after it.

    WORKDIR/config.json      the resolved config          write_run_config / read_run_config
    WORKDIR/checkpoints/     orbax: train state + each process's data position        Checkpointer
    WORKDIR/tokenizer.json   the tokenizer the run trained with   save_run_tokenizer / run_tokenizer
    WORKDIR/data/            the facts data (or data.cache_dir)                    facts_data_dir

Generation, recall and export load a run from here without the trainer (nothing here imports
lmjax.train): the parameters alone (`restore_params`: no optimizer built, no optimizer moments
read), the tokenizer and the facts data folder (`run_task`), without building the dataset.
"""
import dataclasses
import json
import os
import shlex
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


class Checkpointer:
    """orbax checkpoints: the train state (params, optimizer, step, PRNG) plus the data position.

    The train state is saved sharded (every process writes its own shards) and restored onto the
    shardings of whatever abstract state is passed: another mesh, or one device. Each process's
    data position goes to its own file (grain's per-process checkpoint handler), since in a
    multi-host run every process reads different input shards.
    """

    def __init__(self, directory, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, wait: bool = False):
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_DataPosition(data_state))
            ),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()

    def restore(self, abstract_state, step=None, *, data=True):
        """(state, data_state) at `step` (default: latest), laid out like `abstract_state`
        (shapes, dtypes and shardings). `data=False` skips the data position (data_state None)."""
        step = self.latest_step() if step is None else step
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        position = _DataPosition()
        if data:
            items["data"] = grain.checkpoint.CheckpointRestore(position)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as error:
            if "process_" in str(error) and "does not exist" in str(error):
                raise ValueError(
                    f"Checkpoint {step} holds no data position for this process ({error}); it was written "
                    f"by a different number of processes. Resume with the same process count."
                ) from None
            raise
        return restored["state"], position.state

    def restore_params(self, abstract_params, step=None):
        """`state.params` alone at `step` (default: latest), laid out like `abstract_params`
        (see `read_params`)."""
        self.manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        return read_params(self.manager.directory, abstract_params, step)

    def close(self):
        self.manager.wait_until_finished()
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
    """(config, model, params, step) at checkpoint `step` (default: the latest); the parameters
    on the first device, or sharded on `layout`'s mesh (whatever mesh the run trained on)."""
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
        step = steps[-1] if step is None else step
        model = run_model(config)
        params = _params_at(reader, abstract_params(model, config.train.seq_len, layout), step)
    finally:
        reader.close()
    return config, model, params, step


# -- tokenizer -------------------------------------------------------------------------------------

def save_run_tokenizer(workdir, tokenizer):
    """WORKDIR/tokenizer.json, so that generation needs neither the dataset nor its text to
    rebuild the tokenizer (process 0 writes, atomically). `None` (plain ids) writes nothing."""
    from lmjax.data.shakespeare import CharTokenizer
    from lmjax.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer

    if tokenizer is None:
        return
    if isinstance(tokenizer, CharTokenizer):
        saved = tokenizer.to_dict()
    elif isinstance(tokenizer, ByteTokenizer):
        saved = {"type": "byte", "special_tokens": dict(SPECIAL_TOKENS)}
    else:
        raise TypeError(f"save_run_tokenizer does not know how to save a {type(tokenizer).__name__}.")
    _write_atomically(Path(workdir) / TOKENIZER_FILE, json.dumps(saved, indent=2) + "\n")


def _tokenizer_from_file(path: Path):
    from lmjax.data.shakespeare import CharTokenizer
    from lmjax.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer

    saved = json.loads(path.read_text())
    if saved.get("type") == "char":
        return CharTokenizer.from_dict(saved)
    if saved.get("type") == "byte":
        changed = {k: v for k, v in saved.get("special_tokens", {}).items() if SPECIAL_TOKENS.get(k) != v}
        if changed:  # specials are only ever appended, so a run's ids must all still hold
            raise ValueError(
                f"{str(path)!r} holds special tokens {changed} that this lmjax's byte tokenizer numbers "
                f"differently ({SPECIAL_TOKENS}); use the lmjax version the run was trained with."
            )
        return ByteTokenizer()
    raise ValueError(f"{str(path)!r} holds an unknown tokenizer type {saved.get('type')!r}; expected 'char' or 'byte'.")


def _facts_tokenizer():
    from lmjax.data.tokenizer import ByteTokenizer

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
