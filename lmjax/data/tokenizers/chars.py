"""One id per distinct character of a text (Shakespeare's default tokenizer)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """One id per distinct character, ids in sorted character order (stable across runs).

    No special tokens, no end-of-text token and no dialog format: plain text only.
    """

    chars: str

    # Not dataclass fields (no annotation): the same for every character tokenizer.
    eos_id = None
    dialog_format = None

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {}

    def special_id(self, name: str) -> int:
        raise ValueError(f"Unknown special token {name!r}; a character tokenizer has no special tokens.")

    def _index(self) -> dict[str, int]:
        # Built once and cached on the instance; frozen dataclass, so go through __dict__.
        if "_id_of" not in self.__dict__:
            object.__setattr__(self, "_id_of", {c: i for i, c in enumerate(self.chars)})
        return self.__dict__["_id_of"]

    def encode(self, text: str) -> list[int]:
        id_of = self._index()
        try:
            return [id_of[c] for c in text]
        except KeyError as e:
            raise ValueError(f"Character {e.args[0]!r} is not in this tokenizer's vocabulary "
                             f"of {self.vocab_size}; build it from a text that contains it.") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        if d.get("type") != "char":
            raise ValueError(f"not a char tokenizer dict (type={d.get('type')!r}).")
        return cls(d["chars"])
