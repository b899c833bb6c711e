"""The facts task: N people x 4 attributes, learnt in the weights or looked up with a tool.

Modes: `weights` (question -> answer dialogs, answered from the weights), `tool` (the model
queries the facts database and copies the reply) and `bio` (Allen-Zhu & Li's setting: training
on the biographies alone, one text of four sentences a person; the capacity study's mode, about
half the tokens a fact of the qa dialogs).

Evaluators: teacher-forced answers (`eval/qa_acc`, `eval/qa_loss`; in-tool also on unseen
people, `eval/qa_unseen_*`) every `train.eval_every` steps, and with `eval.recall` free
generation at the end of training (`eval/qa_recall`, tools executed for real in-tool). Bio mode
(and weights mode with `data.stored_bits`): `lmjax.eval.stored_bits` every `train.eval_every`
steps, `eval/bio_acc` (facts whose value the model writes after its sentence's start) and
`eval/bio_bits` (bits stored, from the loss on the values; `eval/qa_*` in weights mode).
"""
import dataclasses
from pathlib import Path

from lmjax.registry import ConfigError

MODES = ("weights", "tool", "bio")
BYTE_VOCAB = 260


@dataclasses.dataclass(frozen=True)
class Section:
    name: str = "facts"
    mode: str = "weights"  # weights | tool | bio
    num_people: int = 256
    num_unseen: int = 64
    alpha: float = 0.0  # correlation of the attributes (0 = independent)
    seed: int = 0
    include_biographies: bool = False
    pack: bool = True
    cache_dir: str = ""  # "" = WORKDIR/data
    # In-tool only: qatool dialogs about people outside the database, so that copying the
    # tool's reply, not memorising it, is what training rewards.
    tool_practice_people: int = 2048
    stored_bits: bool = False  # weights mode: also eval/qa_bits and per-attribute recall (bio mode: always)
    input_shards: int = 0  # 0 = one per data-parallel process; batches depend on it, like on the seed


def check(d: Section, *, vocab_size, seq_len, eval_cfg=None):
    from lmjax.data import facts

    if d.mode not in MODES:
        raise ConfigError(f"Unknown facts mode {d.mode!r} in data.mode; choose one of: {', '.join(MODES)}.")
    try:
        facts.validate_params(d.num_people, d.seed, d.num_unseen, d.alpha, prefix="data.")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if d.mode == "bio" and eval_cfg is not None and eval_cfg.recall:
        raise ConfigError(
            "data.mode=bio measures recall teacher-forced (eval/bio_acc: the value is the model's greedy "
            "continuation of its sentence's start), not by answering questions; set eval.recall=False."
        )
    if d.stored_bits and d.mode == "tool":
        raise ConfigError("data.stored_bits counts facts held in the weights; use it with data.mode=weights or bio.")
    if d.tool_practice_people < 0:
        raise ConfigError(f"data.tool_practice_people must be 0 or more (0 = none), got {d.tool_practice_people!r}.")
    names = len(facts.FIRST_NAMES) * len(facts.LAST_NAMES)
    if d.mode == "tool" and d.num_people + d.num_unseen + d.tool_practice_people > names:
        raise ConfigError(
            f"data.tool_practice_people={d.tool_practice_people} practice people do not fit beside "
            f"{d.num_people} + {d.num_unseen} unseen people in the {names} distinct names; "
            f"lower data.tool_practice_people to at most {max(names - d.num_people - d.num_unseen, 0)}."
        )
    if vocab_size < BYTE_VOCAB:
        raise ConfigError(f"model.vocab_size={vocab_size} is below the byte tokenizer's {BYTE_VOCAB} ids.")


def data_folder(d: Section, workdir) -> Path:
    """Where the facts of `d` live (generated there by `build`)."""
    from lmjax.data import facts

    root = Path(d.cache_dir) if d.cache_dir else Path(workdir) / "data"
    return root / facts.cache_dir_name(num_people=d.num_people, seed=d.seed, num_unseen=d.num_unseen, alpha=d.alpha)


def qa_file(d: Section, unseen=False) -> str:
    return "qatool_unseen.jsonl" if unseen else ("qa.jsonl" if d.mode == "weights" else "qatool.jsonl")


def recall_files(d: Section, folder: Path) -> dict:
    """Set name -> dialog file that recall asks: the trained questions, in-tool also unseen people's."""
    files = {"qa": folder / qa_file(d)}
    if d.mode == "tool":
        files["qa_unseen"] = folder / qa_file(d, unseen=True)
    return files


def build(d: Section, *, workdir, seq_len, eval_cfg, vocab_size):
    from lmjax.data import facts
    from lmjax.dialog import encode_dialog, to_training_example
    from lmjax.data.tokenizers.byte import ByteTokenizer
    from lmjax.eval.recall import RecallByGeneration
    from lmjax.eval.teacher_forced import TeacherForced, answer_exact_match
    from lmjax.tasks import TaskData

    folder = facts.load_or_generate(
        data_folder(d, workdir).parent, num_people=d.num_people, seed=d.seed, num_unseen=d.num_unseen, alpha=d.alpha
    )
    tokenizer = ByteTokenizer()

    def examples(filename, loss_on="assistant"):
        return [
            to_training_example(encode_dialog(tokenizer, r["dialog"], loss_on, answer=r["answer"]))
            for r in facts.read_dialogs(folder / filename)
        ]

    if d.mode == "bio":
        train = examples("biographies.jsonl", loss_on="all")
        _check_train_lengths(train, seq_len)
        people = facts.build_population(d.num_people, d.seed, d.num_unseen, d.alpha)[: d.num_people]
        prefixes = [r for i, person in enumerate(people) for r in facts.biography_prefix_records(i, person)]
        return TaskData(train, tokenizer, [_stored_bits("bio", prefixes, tokenizer, eval_cfg)])

    qa = examples(qa_file(d))
    train = qa + examples("biographies.jsonl", loss_on="all") if d.include_biographies else qa
    if d.mode == "tool" and d.tool_practice_people:
        names = {person["name"] for person in facts.build_population(d.num_people, d.seed, d.num_unseen, d.alpha)}
        practice = facts.tool_practice_dialogs(d.tool_practice_people, d.seed, names)
        train = train + [to_training_example(encode_dialog(tokenizer, r["dialog"], answer=r["answer"])) for r in practice]
    _check_train_lengths(train, seq_len)
    eval_sets = {"qa": qa}
    if d.mode == "tool":
        eval_sets["qa_unseen"] = examples(qa_file(d, unseen=True))
    evaluators = [TeacherForced(eval_sets, answer_exact_match, batch_size=eval_cfg.batch_size)]
    if d.stored_bits:
        records = [{**r, "answer": facts.scored_value(r["attribute"], r["answer"])} for r in facts.read_dialogs(folder / "qa.jsonl")]
        evaluators.append(_stored_bits("qa", records, tokenizer, eval_cfg))
    if eval_cfg.recall:
        evaluators.append(RecallByGeneration(
            recall_files(d, folder), tokenizer, known_answers=facts.ATTRIBUTE_VALUES, tool_data_dir=folder if d.mode == "tool" else None,
            lanes=eval_cfg.recall_lanes, chunk=eval_cfg.recall_chunk, max_len=seq_len,
        ))
    return TaskData(train, tokenizer, evaluators)


def _check_train_lengths(train, seq_len):
    from lmjax.data.pipeline import check_lengths

    try:  # here, not at the first batch: a wrong train.seq_len is a config error, found before any compile
        check_lengths(train, seq_len, "training")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _stored_bits(name, records, tokenizer, eval_cfg):
    """StoredBits over fact records (each answered by its scored value), grouped by attribute."""
    from lmjax.dialog import encode_dialog, to_training_example
    from lmjax.eval.stored_bits import StoredBits
    from lmjax.results.capacity import attribute_bits

    by_attribute = {}
    for r in records:
        example = to_training_example(encode_dialog(tokenizer, r["dialog"], answer=r["answer"]))
        by_attribute.setdefault(r["attribute"], []).append(example)
    return StoredBits(name, by_attribute, attribute_bits(), batch_size=eval_cfg.batch_size)
