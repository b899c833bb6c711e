"""Byte-level tokenizer with a few named special tokens.

Ids 0..255 are raw UTF-8 bytes, so any text encodes losslessly without a trained vocabulary.
Special tokens follow the bytes. `encode` never parses special-token strings out of text:
a user typing "<|eod|>" gets those bytes, not the end-of-dialog token, so dialog structure
can only be created by the dialog format (`lmjax.dialog.ByteDialog`, which also decides what
each special means), never smuggled in through content.
"""

from __future__ import annotations

from typing import Iterable

NUM_BYTES = 256

# name -> id, in id order. Append new specials at the end so existing ids stay stable.
SPECIAL_TOKENS: dict[str, int] = {
    "user": 256,
    "assistant": 257,
    "database": 258,
    "eod": 259,
}


def _special_string(name: str) -> str:
    return f"<|{name}|>"


class ByteTokenizer:
    """UTF-8 bytes plus `<|user|> <|assistant|> <|database|> <|eod|>` (the `Tokenizer` interface)."""

    vocab_size: int = NUM_BYTES + len(SPECIAL_TOKENS)
    dialog_format: str = "byte"  # the template of lmjax.dialog that dialogs use with these ids
    eos_id: int = SPECIAL_TOKENS["eod"]  # ends a dialog, so a generation

    def __init__(self) -> None:
        self._id_to_special = {i: _special_string(n) for n, i in SPECIAL_TOKENS.items()}

    @property
    def special_tokens(self) -> dict[str, int]:
        """name -> id ("eod" -> 259): a copy, the numbering is fixed."""
        return dict(SPECIAL_TOKENS)

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def to_dict(self) -> dict:
        return {"type": "byte", "special_tokens": dict(SPECIAL_TOKENS)}

    @classmethod
    def from_dict(cls, d: dict) -> "ByteTokenizer":
        """Check that the saved specials still have their ids (they are only ever appended)."""
        if d.get("type") != "byte":
            raise ValueError(f"not a byte tokenizer dict (type={d.get('type')!r}).")
        changed = {k: v for k, v in d.get("special_tokens", {}).items() if SPECIAL_TOKENS.get(k) != v}
        if changed:
            raise ValueError(
                f"holds special tokens {changed} that this lmjax's byte tokenizer numbers differently "
                f"({SPECIAL_TOKENS}); use the lmjax version the run was trained with."
            )
        return cls()

    def encode(self, text: str) -> list[int]:
        """Plain UTF-8 bytes of `text`; special-token strings are NOT recognised."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; specials render as `<|name|>`, invalid UTF-8 becomes U+FFFD."""
        pieces: list[str] = []
        pending_bytes = bytearray()
        for position, raw_id in enumerate(ids):
            token_id = int(raw_id)
            if 0 <= token_id < NUM_BYTES:
                pending_bytes.append(token_id)
                continue
            if token_id not in self._id_to_special:
                raise ValueError(
                    f"Token id {token_id} at position {position} is outside the byte "
                    f"tokenizer's vocabulary [0, {self.vocab_size}); check the model's "
                    f"vocab_size matches the tokenizer."
                )
            # Flush bytes first so a multi-byte character split by a special stays local.
            pieces.append(pending_bytes.decode("utf-8", errors="replace"))
            pending_bytes.clear()
            pieces.append(self._id_to_special[token_id])
        pieces.append(pending_bytes.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def special_id(self, name: str) -> int:
        """Id of a special token given as "eod" or "<|eod|>"."""
        bare = name[2:-2] if name.startswith("<|") and name.endswith("|>") else name
        if bare not in SPECIAL_TOKENS:
            valid = ", ".join(SPECIAL_TOKENS)
            raise ValueError(f"Unknown special token {name!r}; choose one of: {valid}.")
        return SPECIAL_TOKENS[bare]
