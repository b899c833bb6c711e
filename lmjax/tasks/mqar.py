"""Multi-query associative recall (lmjax/data/mqar.py): fresh train and eval sequences by seed;
`eval/mqar_acc` per query token, `eval/mqar_seq_acc` per sequence."""
import dataclasses

from lmjax.registry import ConfigError


@dataclasses.dataclass(frozen=True)
class Section:
    name: str = "mqar"
    vocab_size: int = 512  # Zoology's is 8,192; 512 keeps the output layer small on a CPU
    seq_len: int = 64
    num_kv_pairs: int = 4
    num_train: int = 100_000
    num_eval: int = 1000
    variant: str = "standard"  # standard | forgetting
    num_reassigned: int = 2  # forgetting only: keys bound again, later, to a new value
    power_a: float = 0.01
    seed: int = 0
    pack: bool = False
    input_shards: int = 0  # 0 = one per data-parallel process; batches depend on it, like on the seed


def check(d: Section, *, vocab_size, seq_len, eval_cfg=None):
    from lmjax.data.mqar import VARIANTS, num_slots, slots_needed

    if d.variant not in VARIANTS:
        raise ConfigError(f"Unknown MQAR variant {d.variant!r} in data.variant; choose one of: {', '.join(VARIANTS)}.")
    for key in ("vocab_size", "seq_len", "num_kv_pairs", "num_train", "num_eval"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"data.{key} must be a positive integer, got {getattr(d, key)!r}.")
    if not d.power_a > 0:
        raise ConfigError(f"data.power_a must be positive, got {d.power_a!r}.")
    if d.variant == "forgetting" and not 1 <= d.num_reassigned <= d.num_kv_pairs:
        raise ConfigError(
            f"data.num_reassigned={d.num_reassigned} must be between 1 and data.num_kv_pairs={d.num_kv_pairs} "
            f"in the forgetting variant."
        )
    reassigned = d.num_reassigned if d.variant == "forgetting" else 0
    needed = slots_needed(d.num_kv_pairs, d.variant, reassigned)
    if num_slots(d.seq_len, d.num_kv_pairs) < needed:
        raise ConfigError(
            f"data.seq_len={d.seq_len} is too short for {needed} queries/rebindings after "
            f"data.num_kv_pairs={d.num_kv_pairs} pairs; raise data.seq_len to at least {2 * d.num_kv_pairs + 2 * needed}."
        )
    if d.num_kv_pairs > d.vocab_size // 2 - 1 or needed > d.vocab_size - d.vocab_size // 2:
        raise ConfigError(
            f"data.vocab_size={d.vocab_size} has {d.vocab_size // 2 - 1} keys, too few for "
            f"data.num_kv_pairs={d.num_kv_pairs}; raise data.vocab_size."
        )
    if vocab_size != d.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} must equal data.vocab_size={d.vocab_size}.")
    if seq_len < d.seq_len:
        raise ConfigError(f"train.seq_len={seq_len} is below data.seq_len={d.seq_len}; raise train.seq_len.")


def build(d: Section, *, workdir, seq_len, eval_cfg, vocab_size):
    from lmjax.data import mqar
    from lmjax.eval.teacher_forced import TeacherForced, token_accuracy
    from lmjax.tasks import TaskData

    sizes = dict(
        vocab_size=d.vocab_size, seq_len=d.seq_len, num_kv_pairs=d.num_kv_pairs, power_a=d.power_a,
        variant=d.variant, num_reassigned=d.num_reassigned,
    )
    # Two independent streams of one seed: the eval sequences are not the training ones.
    train = mqar.MqarSource(mqar.generate(d.num_train, seed=[d.seed, 0], **sizes))
    evals = mqar.MqarSource(mqar.generate(d.num_eval, seed=[d.seed, 1], **sizes))
    examples = [evals[i] for i in range(len(evals))]
    return TaskData(train, None, [TeacherForced({"mqar": examples}, token_accuracy, batch_size=eval_cfg.batch_size)])
