"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023), generated with numpy.

Tokens: keys come from [1, V/2), values from [V/2, V) (V = `vocab_size`, V/2 rounded down);
0 is never a key. A sequence of `seq_len` = L tokens is

    k1 v1 k2 v2 ... kn vn | query region of L - 2n tokens

The n keys are distinct, and so are the n values. The query region is read as `(L - 2n) // 2`
slots of two tokens (slot j = region offsets 2j, 2j + 1). Each key is queried exactly once: its
key token is written at offset 2j of a slot j chosen, without replacement, with probability
proportional to (j + 1) ** (power_a - 1) (power_a = 0.01: most queries sit just after the
context, a few far away). Every other token of the region is filler, uniform over [0, V) as in
Zoology (`random_non_queries`): filler may look like a key or a value, but only query positions
are labelled. At a query position i, `targets[i]` is the key's value and `loss_mask[i] = 1`;
everywhere else targets and loss mask are 0. (The prediction at position i is of the value, so
the label sits on the key token itself; the value is never written after a query.)

Variants (`variant` and the sizes):
- more kv pairs / longer sequences: `num_kv_pairs`, `seq_len` (needs (L - 2n) // 2 >= n slots).
- "forgetting": `num_reassigned` = r of the n keys (the first r of the context, which is in
  random order) are bound again later. Each of them gets two slots in the query region, both
  drawn with the others by the same power law (n + r slots per sequence): the earlier one is
  the *rebinding* `k v'` (key token, then a fresh value v' used nowhere else in the sequence),
  the later one the key's query, whose target is v' -- the value most recently bound to it. The
  other n - r keys are queried once and answer their context value. So, precisely: a key token
  immediately followed by a value token binds that key, and the target at a query is the value
  of the latest binding before it. In this variant filler is uniform over [0, V/2) (never a
  value token), so the context and the rebindings are the only bindings in the sequence; this
  needs (L - 2n) // 2 >= n + r slots.

`generate` builds many sequences at once with array operations only (no per-example Python), and
is deterministic in (seed, sizes). `MqarSource` serves them to the grain pipeline.
"""
import numpy as np

VARIANTS = ("standard", "forgetting")


def num_slots(seq_len: int, num_kv_pairs: int) -> int:
    """Two-token slots in the query region after the n key-value pairs."""
    return (seq_len - 2 * num_kv_pairs) // 2


def slots_needed(num_kv_pairs: int, variant: str, num_reassigned: int) -> int:
    return num_kv_pairs + (num_reassigned if variant == "forgetting" else 0)


def sample_distinct(rng, low: int, high: int, count: int, size: int) -> np.ndarray:
    """[size, count] integers from [low, high), distinct within each row, rows uniformly random.

    Floyd's algorithm, vectorised over rows (`count` array passes, no [size, high - low] table),
    then a per-row shuffle so the order inside a row is uniform too.
    """
    n = high - low
    if count > n:
        raise ValueError(f"Cannot draw {count} distinct values from [{low}, {high}).")
    chosen = np.empty((size, count), np.int64)
    for i, j in enumerate(range(n - count, n)):
        t = rng.integers(0, j + 1, size=size)
        taken = (chosen[:, :i] == t[:, None]).any(axis=1)
        chosen[:, i] = np.where(taken, j, t)
    return rng.permuted(chosen, axis=1) + low


def power_law_slots(rng, num_slots_: int, count: int, size: int, power_a: float) -> np.ndarray:
    """[size, count] distinct slots in [0, num_slots_), drawn one after another without replacement
    with probability proportional to (slot + 1) ** (power_a - 1) (Gumbel top-k: the same law as
    `np.random.choice(num_slots_, count, replace=False, p=p)`, for all rows at once).
    Column c is the c-th draw."""
    log_p = (power_a - 1.0) * np.log(np.arange(1, num_slots_ + 1))
    keys = log_p[None, :] + rng.gumbel(size=(size, num_slots_))
    top = np.argpartition(-keys, count - 1, axis=1)[:, :count]
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def generate(
    num_examples: int,
    *,
    vocab_size: int = 8192,
    seq_len: int = 64,
    num_kv_pairs: int = 8,
    power_a: float = 0.01,
    variant: str = "standard",
    num_reassigned: int = 0,
    seed=0,
) -> dict:
    """MQAR sequences as [num_examples, seq_len] int32 arrays `inputs`, `targets`, `loss_mask`.

    `seed`: an int or a sequence of ints (numpy `default_rng`). See the module docstring for
    the format. Raises ValueError for sizes that do not fit.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown MQAR variant {variant!r}; choose one of: {', '.join(VARIANTS)}.")
    n, size, half = num_kv_pairs, num_examples, vocab_size // 2
    r = num_reassigned if variant == "forgetting" else 0
    if not 0 <= r <= n:
        raise ValueError(f"num_reassigned={r} must be between 0 and num_kv_pairs={n}.")
    if n > half - 1 or n + r > vocab_size - half:
        raise ValueError(f"vocab_size={vocab_size} has too few keys or values for {n} pairs (+{r} rebindings).")
    slots = num_slots(seq_len, n)
    if slots < n + r:
        raise ValueError(f"seq_len={seq_len} leaves {max(slots, 0)} query slots; {n + r} are needed.")
    rng = np.random.default_rng(seed)
    keys = sample_distinct(rng, 1, half, n, size)  # [B, n]
    values = sample_distinct(rng, half, vocab_size, n + r, size)  # [B, n + r]: the last r are new values
    filler_high = half if variant == "forgetting" else vocab_size
    inputs = rng.integers(0, filler_high, size=(size, seq_len))
    rows = np.arange(size)[:, None]
    inputs[:, 0 : 2 * n : 2] = keys
    inputs[:, 1 : 2 * n : 2] = values[:, :n]

    drawn = power_law_slots(rng, slots, n + r, size, power_a)  # [B, n + r]
    query_slot = drawn[:, :n].copy()
    answer = values[:, :n].copy()
    if r:
        # Keys 0..r-1 own two slots: the earlier rebinds the key, the later queries it.
        first, second = drawn[:, :r], drawn[:, n:]
        rebind_pos = 2 * n + 2 * np.minimum(first, second)
        query_slot[:, :r] = np.maximum(first, second)
        inputs[rows, rebind_pos] = keys[:, :r]
        inputs[rows, rebind_pos + 1] = values[:, n:]
        answer[:, :r] = values[:, n:]
    query_pos = 2 * n + 2 * query_slot
    inputs[rows, query_pos] = keys
    targets = np.zeros((size, seq_len), np.int64)
    loss_mask = np.zeros((size, seq_len), np.int32)
    targets[rows, query_pos] = answer
    loss_mask[rows, query_pos] = 1
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32), "loss_mask": loss_mask}


class MqarSource:
    """Random-access examples over generated arrays, for `grain.MapDataset.source` (no per-example
    dicts held in memory). Each example: `inputs`, `targets`, `loss_mask` and `answer_mask`
    (= the loss mask: the query positions, which evaluation scores)."""

    def __init__(self, arrays: dict):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["inputs"])

    def __getitem__(self, index: int) -> dict:
        example = {key: value[index] for key, value in self.arrays.items()}
        example["answer_mask"] = example["loss_mask"]
        return example

    def __repr__(self) -> str:
        return f"MqarSource({len(self)} sequences of {self.arrays['inputs'].shape[1]} tokens)"
