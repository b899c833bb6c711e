"""Byte-level BPE (the `tokenizers` library): the tokenizer of released models such as SmolLM2.

Two sources, one class:
  * `BPETokenizer.from_gguf(path)` builds the `tokenizers.Tokenizer` from a GGUF file's metadata
    (read with `gguf.GGUFReader`): `tokenizer.ggml.tokens` (already spelled in the byte-level
    alphabet), `merges`, `token_type` (CONTROL tokens are the special tokens, USER_DEFINED ones
    are added tokens), the bos / eos / padding / unknown ids, `tokenizer.chat_template`, and
    `tokenizer.ggml.pre`, which names llama.cpp's pre-tokenizer (see `PRE_TOKENIZERS`).
  * `BPETokenizer.from_hf_folder(folder)` reads `tokenizer.json` + `tokenizer_config.json`.
`save_hf_files(out_dir)` writes the folder back (what `transformers.AutoTokenizer` loads).

`encode` never turns special-token strings in the text into special tokens ("<|im_end|>" typed
by a user is ordinary text); `lmjax.dialog.ChatML` places them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from lmjax.extras import require

require("tokenizers", "interop")  # before importing it: a missing extra is one line, naming it
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL = 3
_USER_DEFINED = 4


def _byte_level():
    # The GPT-2 split ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+), then the
    # byte -> printable-character mapping the vocabulary is spelled in.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_pre_tokenizer():
    # llama.cpp's "smollm" (as "starcoder"): first every digit on its own ("\p{N}"), then the GPT-2
    # split on each piece. `Digits(individual_digits=True)` is that first regex.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


# tokenizer.ggml.pre -> the pre-tokenizer that splits text as llama.cpp does for it.
PRE_TOKENIZERS = {
    "default": _byte_level,
    "gpt2": _byte_level,
    "smollm": _smollm_pre_tokenizer,
    "starcoder": _smollm_pre_tokenizer,
}


def _token_content(value) -> str | None:
    """A token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class BPETokenizer:
    """A `tokenizers.Tokenizer` with its special tokens, eos and chat template (the `Tokenizer` interface).

    `special_tokens` maps each special token's text ("<|im_end|>") to its id; `special_id` also
    takes the bare name ("im_end").
    """

    def __init__(self, tokenizer: Tokenizer, *, special_tokens: dict[str, int], eos_id: int | None = None,
                 bos_id: int | None = None, pad_id: int | None = None, unk_id: int | None = None,
                 chat_template: str | None = None):
        self._tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self.eos_id, self.bos_id, self.pad_id, self.unk_id = eos_id, bos_id, pad_id, unk_id
        self.chat_template = chat_template
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        is_chatml = bool(chat_template) and "<|im_start|>" in chat_template and {"<|im_start|>", "<|im_end|>"} <= set(special_tokens)
        self.dialog_format = "chatml" if is_chatml else None
        # A copy that reads special-token strings as plain text: `encode` never creates specials.
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path) -> "BPETokenizer":
        """Build the tokenizer a GGUF file's metadata describes (byte-level BPE files only)."""
        require("gguf", "interop")
        from gguf import GGUFReader

        path = Path(path)
        reader = GGUFReader(str(path))

        def field(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{str(path)!r} holds a {kind!r} tokenizer; only byte-level BPE ('gpt2') files are supported.")
        pre = field("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"{str(path)!r} asks for pre-tokenizer {pre!r}; supported: {', '.join(sorted(PRE_TOKENIZERS))}.")
        tokens = list(field("tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges")]
        token_types = list(field("tokenizer.ggml.token_type", [1] * len(tokens)))

        model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        control = [t for t, kind in zip(tokens, token_types) if kind == _CONTROL]
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        user_defined = [t for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED]
        if user_defined:
            tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
        if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ValueError(f"{str(path)!r}: building its tokenizer added tokens outside its {len(tokens)}-token vocabulary.")

        ids = {name: field(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding", "unknown")}
        ids = {k: (None if v is None else int(v)) for k, v in ids.items()}
        return cls(
            tokenizer, special_tokens={t: tokens.index(t) for t in control},
            eos_id=ids["eos"], bos_id=ids["bos"], pad_id=ids["padding"], unk_id=ids["unknown"],
            chat_template=field("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_folder(cls, folder) -> "BPETokenizer":
        """Read a Hugging Face tokenizer folder: tokenizer.json, tokenizer_config.json (special and
        added tokens, bos / eos / pad / unk, chat_template; or chat_template.jinja beside it)."""
        folder = Path(folder)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}

        special = {}
        for token_id, added in config.get("added_tokens_decoder", {}).items():
            if added.get("special"):
                special[added["content"]] = int(token_id)
        if not special:  # no tokenizer_config.json: the added tokens tokenizer.json marks special
            tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            special = {a["content"]: a["id"] for a in tokenizer_json.get("added_tokens", []) if a.get("special")}

        def token_id(key):
            content = _token_content(config.get(key))
            return None if content is None else tokenizer.token_to_id(content)

        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(
            tokenizer, special_tokens=dict(sorted(special.items(), key=lambda kv: kv[1])),
            eos_id=token_id("eos_token"), bos_id=token_id("bos_token"), pad_id=token_id("pad_token"),
            unk_id=token_id("unk_token"), chat_template=template,
        )

    # -- the interface --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of plain `text`; special-token strings in it stay text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens render as their strings."""
        ids = [int(i) for i in ids]
        for position, token_id in enumerate(ids):
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"Token id {token_id} at position {position} is outside the BPE vocabulary "
                    f"[0, {self.vocab_size}); check the model's vocab_size matches the tokenizer."
                )
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def special_id(self, name: str) -> int:
        """Id of a special token given as its text ("<|im_end|>") or its bare name ("im_end")."""
        for candidate in (name, f"<|{name}|>", f"<{name}>"):
            if candidate in self.special_tokens:
                return self.special_tokens[candidate]
        raise ValueError(f"Unknown special token {name!r}; choose one of: {', '.join(self.special_tokens)}.")

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of one id, as the tokenizer spells it (byte-level alphabet)."""
        return self._tokenizer.id_to_token(int(token_id))

    def __eq__(self, other) -> bool:
        return isinstance(other, BPETokenizer) and other.to_dict() == self.to_dict()

    __hash__ = None  # mutable-free but expensive to hash; compare with ==

    def to_dict(self) -> dict:
        return {
            "type": "bpe",
            "tokenizer_json": self._tokenizer.to_str(),
            "special_tokens": dict(self.special_tokens),
            "eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id, "unk_id": self.unk_id,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        if d.get("type") != "bpe":
            raise ValueError(f"not a bpe tokenizer dict (type={d.get('type')!r}).")
        if "tokenizer_json" not in d:
            raise ValueError("bpe tokenizer dict has no 'tokenizer_json'.")
        return cls(
            Tokenizer.from_str(d["tokenizer_json"]), special_tokens={k: int(v) for k, v in d.get("special_tokens", {}).items()},
            eos_id=d.get("eos_id"), bos_id=d.get("bos_id"), pad_id=d.get("pad_id"), unk_id=d.get("unk_id"),
            chat_template=d.get("chat_template"),
        )

    # -- Hugging Face files ----------------------------------------------------------------------

    def save_hf_files(self, out_dir) -> list[Path]:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`
        (created if needed): a folder `transformers.AutoTokenizer.from_pretrained` loads with the
        same ids. Returns the paths written."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        by_id = {i: t for t, i in self.special_tokens.items()}

        def text_of(token_id):
            return None if token_id is None else self._tokenizer.id_to_token(token_id)

        named = {
            "bos_token": text_of(self.bos_id), "eos_token": text_of(self.eos_id),
            "pad_token": text_of(self.pad_id), "unk_token": text_of(self.unk_id),
        }
        named = {k: v for k, v in named.items() if v is not None}
        extra = [t for t in self.special_tokens if t not in named.values()]
        special_map = {**named, "additional_special_tokens": extra}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": {
                str(a_id): {"content": content, "special": a_id in by_id, "normalized": False,
                            "lstrip": False, "rstrip": False, "single_word": False}
                for a_id, content in sorted(self._added_tokens().items())
            },
            **special_map,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        files = {
            "tokenizer.json": self._tokenizer.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False),
        }
        written = []
        for name, text in files.items():
            (out_dir / name).write_text(text + "\n", encoding="utf-8")
            written.append(out_dir / name)
        return written

    def _added_tokens(self) -> dict[int, str]:
        return {i: added.content for i, added in self._tokenizer.get_added_tokens_decoder().items()}
