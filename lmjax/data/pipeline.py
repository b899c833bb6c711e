"""grain pipelines: training examples -> shuffled, packed (or padded), fixed-shape batches.

An example is a dict of equal-length 1-D int32 arrays `inputs`, `targets`, `loss_mask` (already
shifted: loss_mask[i] weights the prediction of targets[i]) and optionally `prompt` (input i is
a prefix-LM prompt token; zeros when absent). A batch is a dict of [B, L] int32
arrays with those keys plus `segment_ids` (0 = padding) and `positions` (restarting at 0 in each
packed example), so attention and RoPE never cross example boundaries.

The iterator's position is a small JSON-able dict (`get_state`/`set_state`), which the
checkpoint stores so a resumed run sees exactly the batches an uninterrupted run would.
"""
from typing import Sequence

import grain
import numpy as np

from lmjax.registry import ConfigError

PACKED_KEYS = ("inputs", "targets", "loss_mask", "prompt")


def _with_prompt(example):
    if "prompt" in example:
        return example
    return {**example, "prompt": np.zeros(len(example["inputs"]), np.int32)}


def check_lengths(examples: Sequence[dict], seq_len: int, what: str):
    longest = max(len(e["inputs"]) for e in examples)
    if longest > seq_len:
        raise ValueError(
            f"The longest {what} example has {longest} tokens but train.seq_len is {seq_len}; "
            f"raise train.seq_len to at least {longest}."
        )


def longest_example(examples) -> int:
    """Tokens in the longest example of an in-memory list; 0 (not measured) for other sources,
    whose examples (text windows, MQAR sequences) fill whole rows anyway."""
    if not isinstance(examples, list) or not examples:
        return 0
    return max(len(e["inputs"]) for e in examples)


def _pad_one(example, seq_len, keys=PACKED_KEYS):
    """One example as a row of `seq_len`: `keys` zero-padded, plus segment ids and positions."""
    example = _with_prompt(example)
    n = len(example["inputs"])
    out = {}
    for key in keys:
        padded = np.zeros(seq_len, np.int32)
        padded[:n] = example[key]
        out[key] = padded
    out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    out["positions"] = np.arange(seq_len, dtype=np.int32)
    return out


def _rename_packed(batch):
    return {
        **{key: batch[key] for key in PACKED_KEYS},
        "segment_ids": batch["inputs_segment_ids"],
        "positions": batch["inputs_positions"],
    }


def train_batches(
    examples: Sequence[dict],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    pack: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """An endless stream of batches: each epoch reshuffled by `seed`; this host's shard only.

    `examples`: any random-access sequence of examples (a list, or a grain-style source).
    """
    if isinstance(examples, list):
        check_lengths(examples, seq_len, "training")
        examples = [{k: np.asarray(e[k], np.int32) for k in PACKED_KEYS} for e in map(_with_prompt, examples)]
    source = grain.MapDataset.source(examples)[shard_index::shard_count]
    # In-memory examples: reading threads would only add per-element overhead (4x slower).
    no_threads = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    stream = source.map(_with_prompt).shuffle(seed=seed).repeat(None).to_iter_dataset(no_threads)
    if pack:
        stream = grain.experimental.FirstFitPackIterDataset(
            stream,
            length_struct={key: seq_len for key in PACKED_KEYS},
            num_packing_bins=batch_size,
            seed=seed,
            shuffle_bins=True,
        )
        return stream.batch(batch_size, drop_remainder=True).map(_rename_packed)
    return stream.map(lambda e: _pad_one(e, seq_len)).batch(batch_size, drop_remainder=True)


def padded_batches(examples: Sequence[dict], *, seq_len: int, batch_size: int, keys=PACKED_KEYS):
    """Evaluation batches, in order, one example per row; the last batch is padded with empty rows.

    Yields (batch, n_real_rows). Every batch has the same shape, so evaluation compiles once.
    """
    check_lengths(examples, seq_len, "evaluation")
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = [_pad_one(e, seq_len, keys) for e in chunk]
        empty = _pad_one({k: np.zeros(0, np.int32) for k in keys}, seq_len, keys)
        rows += [empty] * (batch_size - len(chunk))
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}, len(chunk)



class InputShards:
    """This process's rows of every global batch, read from its own input shards only.

    The examples are split into `shards` disjoint parts (shard s takes examples s, s + shards,
    ...), each with its own shuffled, packed stream filling `batch_size / shards` rows of every
    global batch. A process reads only the shards for the rows its devices hold, so the global
    batches depend on the number of shards but not on how many processes share the work: one
    process reading shards 0 and 1 sees exactly the batches that two processes see together.
    Checkpointable: `get_state`/`set_state` hold one position per owned shard.
    """

    def __init__(self, examples, *, seq_len, batch_size, seed, pack, shards=1, rows=None):
        """`rows`: [start, stop) of the global batch this process fills (default: all)."""
        start, stop = rows or (0, batch_size)
        if shards <= 0 or batch_size % shards:
            raise ConfigError(f"train.batch_size={batch_size} must be divisible by data.input_shards={shards}.")
        per_shard = batch_size // shards
        if start % per_shard or stop % per_shard:
            raise ConfigError(
                f"This process holds rows [{start}, {stop}) of each batch, which do not line up with "
                f"data.input_shards={shards} shards of {per_shard} rows; use a multiple of the process count."
            )
        self.shard_ids = list(range(start // per_shard, stop // per_shard))
        self._streams = [
            iter(train_batches(examples, seq_len=seq_len, batch_size=per_shard, seed=seed, pack=pack,
                               shard_index=s, shard_count=shards))
            for s in self.shard_ids
        ]

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(stream) for stream in self._streams]
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def get_state(self) -> dict:
        return {"shards": self.shard_ids, "states": [stream.get_state() for stream in self._streams]}

    def set_state(self, state: dict):
        if state["shards"] != self.shard_ids:
            raise ValueError(
                f"The checkpoint's data position is for input shards {state['shards']} in this process, "
                f"but this process now reads shards {self.shard_ids}: resume with the same process count "
                f"and data.input_shards."
            )
        for stream, position in zip(self._streams, state["states"]):
            stream.set_state(position)
