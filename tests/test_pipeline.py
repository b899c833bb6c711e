import numpy as np
import pytest

from lmjax.data.pipeline import InputShards, padded_batches, train_batches
from lmjax.registry import ConfigError


def make_examples(n=60, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 20))
        tokens = rng.integers(0, 250, length + 1).astype(np.int32)
        tokens[0] = 250 + (i % 10)  # a marker so examples can be recognised after packing
        out.append({"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": rng.integers(0, 2, length).astype(np.int32)})
    return out


def unpack(batch):
    """Recover the examples of a packed batch from segment ids (independent of the packer)."""
    found = []
    for row in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            where = seg == s
            idx = np.flatnonzero(where)
            assert np.all(np.diff(idx) == 1), "a packed example must be contiguous"
            np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.sum()))
            found.append({k: batch[k][row][where] for k in ("inputs", "targets", "loss_mask")})
    return found


def key(e):
    return tuple(e["inputs"].tolist()) + ("|",) + tuple(e["targets"].tolist()) + tuple(e["loss_mask"].tolist())


def test_packing_keeps_every_example_intact_once_per_epoch():
    examples = make_examples()
    it = iter(train_batches(examples, seq_len=32, batch_size=4, seed=1))
    seen = []
    while len(seen) < 3 * len(examples):
        batch = next(it)
        assert batch["inputs"].shape == (4, 32)
        assert np.all(batch["loss_mask"][batch["segment_ids"] == 0] == 0)
        seen += unpack(batch)
    # Packing bins may hold an epoch boundary, so check counts over whole epochs loosely:
    # every example appears, and none more than once per epoch plus the bins in flight.
    counts = {}
    for e in seen:
        counts[key(e)] = counts.get(key(e), 0) + 1
    assert set(counts) == {key(e) for e in examples}
    assert max(counts.values()) - min(counts.values()) <= 2


def test_padding_mode_one_example_per_row():
    examples = make_examples(10)
    batch = next(iter(train_batches(examples, seq_len=24, batch_size=5, seed=0, pack=False)))
    assert batch["segment_ids"].max() == 1
    for row in unpack(batch):
        assert key(row) in {key(e) for e in examples}


def test_iterator_state_resumes_exactly():
    examples = make_examples()
    it = iter(train_batches(examples, seq_len=32, batch_size=4, seed=3))
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    fresh = iter(train_batches(examples, seq_len=32, batch_size=4, seed=3))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_different_seeds_give_different_orders():
    examples = make_examples()
    a = next(iter(train_batches(examples, seq_len=32, batch_size=4, seed=0)))
    b = next(iter(train_batches(examples, seq_len=32, batch_size=4, seed=1)))
    assert not np.array_equal(a["inputs"], b["inputs"])


def test_too_long_example_is_a_clear_error():
    examples = make_examples()
    with pytest.raises(ValueError, match="raise train.seq_len"):
        train_batches(examples, seq_len=8, batch_size=4, seed=0)


def test_padded_eval_batches_cover_all_examples_in_order():
    examples = make_examples(11)
    rows = []
    for batch, n_real in padded_batches(examples, seq_len=24, batch_size=4):
        assert batch["inputs"].shape == (4, 24)
        rows += unpack({k: v[:n_real] for k, v in batch.items()})
    assert [key(r) for r in rows] == [key(e) for e in examples]


def test_packed_prompt_flags_stay_with_their_dialog():
    """Each dialog's prompt (prefix-LM) is packed with it: a prefix of its segment, of the
    length the dialog encoder gave it."""
    from lmjax.dialog import encode_dialog, to_training_example
    from lmjax.data.tokenizers.byte import ByteTokenizer

    tok = ByteTokenizer()
    examples = [
        to_training_example(encode_dialog(tok, [
            {"source": "user", "content": "q" * (i + 1)}, {"source": "assistant", "content": "a" * (7 - i)},
        ]))
        for i in range(6)
    ]
    batch = next(iter(train_batches(examples, seq_len=32, batch_size=2, seed=0)))
    seen = 0
    for row in range(2):
        for segment in set(batch["segment_ids"][row].tolist()) - {0}:
            where = batch["segment_ids"][row] == segment
            prompt = batch["prompt"][row][where]
            user_bytes = int((batch["inputs"][row][where] == ord("q")).sum())
            # <user> + the question bytes + <assistant>
            assert prompt.tolist() == [1] * (user_bytes + 2) + [0] * (int(where.sum()) - user_bytes - 2)
            seen += 1
    assert seen >= 2


def input_shards(rows=None, shards=2, examples=None):
    return InputShards(examples or make_examples(), seq_len=32, batch_size=8, seed=5, pack=True, shards=shards, rows=rows)


def test_one_process_reading_two_input_shards_sees_what_two_processes_see_together():
    both, first, second = input_shards(), input_shards(rows=(0, 4)), input_shards(rows=(4, 8))
    assert (both.shard_ids, first.shard_ids, second.shard_ids) == ([0, 1], [0], [1])
    for _ in range(6):
        batch, top, bottom = next(both), next(first), next(second)
        for k in batch:
            np.testing.assert_array_equal(batch[k], np.concatenate([top[k], bottom[k]]))


def test_input_shards_hold_disjoint_examples_that_cover_the_data():
    examples = make_examples()
    seen = [set(), set()]
    for shard, rows in enumerate([(0, 4), (4, 8)]):
        it = input_shards(rows=rows, examples=examples)
        for _ in range(40):
            seen[shard].update(key(e) for e in unpack(next(it)))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {key(e) for e in examples}


def test_input_shards_resume_from_their_state_and_refuse_another_layout():
    it = input_shards()
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = next(it)
    fresh = input_shards()
    fresh.set_state(state)
    for k, v in next(fresh).items():
        np.testing.assert_array_equal(v, expected[k])
    with pytest.raises(ValueError, match="same process count"):
        input_shards(rows=(0, 4)).set_state(state)


def test_input_shards_that_do_not_line_up_with_a_process_rows_are_a_config_error():
    with pytest.raises(ConfigError, match="input_shards=4"):
        input_shards(rows=(0, 3), shards=4)
    with pytest.raises(ConfigError, match="divisible"):
        input_shards(shards=3)
