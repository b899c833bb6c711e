"""A sentencepiece tokenizer trained in memory on a local corpus.

    tok = SentencePieceTokenizer.train(text, vocab_size=1024)

Training runs the sentencepiece trainer on an iterator of sentences and writes the model into a
BytesIO (no files). It is set up for language modelling on raw text:
  * byte_fallback: a character the vocabulary lacks becomes its UTF-8 byte pieces, so any text
    encodes and decodes back exactly;
  * no normalisation, no dummy prefix, whitespace kept as is, and "\\n" a piece of its own, so
    `decode(encode(text)) == text` for every text;
  * one thread, every sentence read in order (no sampling, no shuffling): the same text and
    options give the same model, byte for byte.
Sentences are the text's paragraphs (split at blank lines, each keeping its newlines), or the
items of an iterator as given.

Ids: 0 <unk>, 1 <s>, 2 </s>, then "\\n", the 256 byte pieces and the learned pieces. `</s>` is
the end-of-text token (`eos_id`). `to_dict` stores the serialized model proto in base64.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Iterable, Iterator

import sentencepiece as spm

MODEL_TYPES = ("bpe", "unigram")
_SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>"}


def _sentences(text_or_iterator) -> Iterator[str]:
    if isinstance(text_or_iterator, str):
        # Paragraphs keep their inner newlines; the blank line between them is re-attached so
        # that "\n\n" is seen in training too.
        for paragraph in text_or_iterator.split("\n\n"):
            if paragraph:
                yield paragraph + "\n\n"
    else:
        for sentence in text_or_iterator:
            if sentence:
                yield sentence


class SentencePieceTokenizer:
    """A sentencepiece model (the `Tokenizer` interface); build with `train` or from a model proto."""

    dialog_format = None  # plain text

    def __init__(self, model_proto: bytes):
        self.model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.special_tokens = {
            name: self._sp.piece_to_id(piece) for name, piece in _SPECIAL_PIECES.items()
            if self._sp.piece_to_id(piece) != self._sp.unk_id() or name == "unk"
        }
        self.eos_id = self.special_tokens.get("eos")

    @classmethod
    def train(
        cls, text_or_iterator: str | Iterable[str], vocab_size: int, *, model_type: str = "bpe",
        character_coverage: float = 1.0, max_sentence_length: int = 1 << 16,
    ) -> "SentencePieceTokenizer":
        """Train on a text (split into paragraphs) or an iterator of sentences; deterministic."""
        if model_type not in MODEL_TYPES:
            raise ValueError(f"Unknown sentencepiece model_type {model_type!r}; choose one of: {', '.join(MODEL_TYPES)}.")
        # 3 control pieces + "\n" + 256 bytes must fit, plus at least a few learned pieces.
        if vocab_size < 300:
            raise ValueError(f"A sentencepiece vocab_size must be at least 300 (3 specials, newline, 256 bytes); got {vocab_size}.")
        model = io.BytesIO()
        try:
            cls._run_trainer(model, text_or_iterator, vocab_size, model_type, character_coverage, max_sentence_length)
        except RuntimeError as e:
            if match := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e)):
                raise ValueError(
                    f"sentencepiece vocab_size {vocab_size} cannot hold this text's characters, the byte pieces and the "
                    f"specials ({match[2]} pieces); raise vocab_size."
                ) from None
            raise
        return cls(model.getvalue())

    @staticmethod
    def _run_trainer(model, text_or_iterator, vocab_size, model_type, character_coverage, max_sentence_length):
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(text_or_iterator),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            user_defined_symbols=["\n"],
            split_digits=True,
            max_sentence_length=max_sentence_length,
            input_sentence_size=0,  # read every sentence: no sampling
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,  # warnings and errors only
        )

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; "<s>" or "</s>" in the text are plain characters, never the control tokens."""
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        for position, token_id in enumerate(ids):
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"Token id {token_id} at position {position} is outside the sentencepiece vocabulary "
                    f"[0, {self.vocab_size}); check the model's vocab_size matches the tokenizer."
                )
        return self._sp.decode(ids)

    def special_id(self, name: str) -> int:
        """Id of "unk", "bos" or "eos" (also accepted as "<unk>", "<s>", "</s>")."""
        by_piece = {piece: name for name, piece in _SPECIAL_PIECES.items()}
        key = by_piece.get(name, name)
        if key not in self.special_tokens:
            raise ValueError(f"Unknown special token {name!r}; choose one of: {', '.join(self.special_tokens)}.")
        return self.special_tokens[key]

    def __eq__(self, other) -> bool:
        return isinstance(other, SentencePieceTokenizer) and other.model_proto == self.model_proto

    def __hash__(self) -> int:
        return hash(self.model_proto)

    def to_dict(self) -> dict:
        return {"type": "sentencepiece", "model_proto": base64.b64encode(self.model_proto).decode("ascii")}

    @classmethod
    def from_dict(cls, d: dict) -> "SentencePieceTokenizer":
        if d.get("type") != "sentencepiece":
            raise ValueError(f"not a sentencepiece tokenizer dict (type={d.get('type')!r}).")
        if "model_proto" not in d:
            raise ValueError("sentencepiece tokenizer dict has no 'model_proto'.")
        return cls(base64.b64decode(d["model_proto"]))
