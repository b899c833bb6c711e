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

