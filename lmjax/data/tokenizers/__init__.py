"""Tokenizers behind one interface, and the file a run folder keeps them in.

Every tokenizer lmjax trains or generates with implements `Tokenizer` (below). The kinds:

  * `byte.ByteTokenizer`: UTF-8 bytes + `<|user|> <|assistant|> <|database|> <|eod|>` (the
    facts task; dialog format "byte"),
  * `chars.CharTokenizer`: one id per character of a text (Shakespeare's default),
  * `sentencepiece.SentencePieceTokenizer`: trained in memory on a local corpus,
  * `bpe.BPETokenizer`: byte-level BPE (the `tokenizers` library), built from a GGUF file's
    metadata or read from a Hugging Face folder; SmolLM2's uses dialog format "chatml".

`to_dict()` gives a JSON-able dict whose "type" names the kind; `tokenizer_from_dict` turns it
back into a tokenizer with the same ids. `save_tokenizer` / `load_tokenizer` write and read that
dict as a file (a run folder's `tokenizer.json`). `pretrained_tokenizer(path)` reads the tokenizer
of a released model: a `.gguf` file or a Hugging Face folder.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

__all__ = [
    "Tokenizer", "TOKENIZER_TYPES", "tokenizer_from_dict", "save_tokenizer", "load_tokenizer", "pretrained_tokenizer",
]


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer provides.

    vocab_size:     number of ids; every id `encode` or the model produces is in [0, vocab_size).
    encode(text):   ids of plain text. Special-token strings in the text are NOT parsed: "<|eod|>"
                    typed by a user encodes as ordinary text, so only the dialog format
                    (`lmjax.dialog`) can place special tokens.
    decode(ids):    text of ids; special tokens render as their strings.
    special_id(n):  id of the special token `n`; a ValueError listing the valid names otherwise.
    special_tokens: name -> id of every special token ({} when there are none).
    eos_id:         the token that ends a text or a turn, used to stop generation (None: none).
    dialog_format:  name of the `lmjax.dialog` format dialogs use with these ids ("byte",
                    "chatml"), or None for plain text.
    to_dict():      JSON-able dict with a "type" key; `tokenizer_from_dict` inverts it.
    """

    vocab_size: int
    special_tokens: dict[str, int]
    eos_id: int | None
    dialog_format: str | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def special_id(self, name: str) -> int: ...

    def to_dict(self) -> dict: ...


# "type" of a to_dict() -> "module:class" with a `from_dict` classmethod. Imported on demand, so
# reading a byte tokenizer never imports sentencepiece or tokenizers.
TOKENIZER_TYPES: dict[str, str] = {
    "byte": "lmjax.data.tokenizers.byte:ByteTokenizer",
    "char": "lmjax.data.tokenizers.chars:CharTokenizer",
    "sentencepiece": "lmjax.data.tokenizers.sentencepiece:SentencePieceTokenizer",
    "bpe": "lmjax.data.tokenizers.bpe:BPETokenizer",
}


def _tokenizer_class(type_name):
    if type_name not in TOKENIZER_TYPES:
        raise ValueError(f"unknown tokenizer type {type_name!r}; expected one of: {', '.join(sorted(TOKENIZER_TYPES))}.")
    module, name = TOKENIZER_TYPES[type_name].split(":")
    return getattr(importlib.import_module(module), name)


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """The tokenizer `d` (a `to_dict()` result) describes, with the same ids."""
    if not isinstance(d, dict):
        raise ValueError(f"A tokenizer dict must be a JSON object; got {type(d).__name__}.")
    return _tokenizer_class(d.get("type")).from_dict(d)


def save_tokenizer(path, tokenizer: Tokenizer) -> None:
    """Write `tokenizer.to_dict()` as JSON to `path`, atomically (a temporary name, then a rename)."""
    path = Path(path)
    text = json.dumps(tokenizer.to_dict(), indent=1) + "\n"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer `save_tokenizer` wrote to `path`. A ValueError names the file when it cannot be read."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not a tokenizer file (invalid JSON: {e}).") from None
    try:
        return tokenizer_from_dict(saved)
    except ValueError as e:
        raise ValueError(f"{str(path)!r}: {e}") from None


def pretrained_tokenizer(path):
    """The byte-level BPE tokenizer of a released model: a `.gguf` file, or a Hugging Face folder
    (`tokenizer.json` + `tokenizer_config.json`)."""
    from lmjax.data.tokenizers.bpe import BPETokenizer

    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return BPETokenizer.from_gguf(path)
        raise ValueError(f"{str(path)!r} is not a GGUF file; give a .gguf file or a Hugging Face folder with tokenizer.json.")
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return BPETokenizer.from_hf_folder(path)
        raise ValueError(f"{str(path)!r} has no tokenizer.json; give a .gguf file or a Hugging Face folder with tokenizer.json.")
    raise ValueError(f"{str(path)!r} does not exist; give a .gguf file or a Hugging Face folder with tokenizer.json.")
