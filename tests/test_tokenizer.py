import numpy as np
import pytest

from lmjax.data.tokenizers.byte import ByteTokenizer


def random_unicode_text(rng, length):
    # Mix ASCII with code points from every plane, skipping surrogates (not encodable in UTF-8).
    chars = []
    for _ in range(length):
        high = [0x80, 0x800, 0x10000, 0x110000][rng.integers(4)]
        code = int(rng.integers(1, high))
        if 0xD800 <= code <= 0xDFFF:
            code = ord("x")
        chars.append(chr(code))
    return "".join(chars)


def test_vocab_size_and_special_ids():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260
    assert [tok.special_id(n) for n in ("user", "assistant", "database", "eod")] == [256, 257, 258, 259]
    assert tok.special_id("<|database|>") == 258
    assert tok.dialog_format == "byte"  # lmjax.dialog decides what the specials mean
    with pytest.raises(ValueError, match="choose one of"):
        tok.special_id("system")


def test_round_trip_random_unicode_with_specials():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    for _ in range(50):
        parts = [random_unicode_text(rng, int(rng.integers(0, 20))) for _ in range(3)]
        ids = tok.encode(parts[0]) + [256] + tok.encode(parts[1]) + [259] + tok.encode(parts[2])
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == parts[0] + "<|user|>" + parts[1] + "<|eod|>" + parts[2]
        assert tok.decode(np.asarray(tok.encode(parts[0]), dtype=np.int32)) == parts[0]


def test_encode_does_not_parse_special_strings():
    tok = ByteTokenizer()
    assert tok.encode("<|eod|>") == list(b"<|eod|>")
    assert tok.encode("é") == [0xC3, 0xA9]


def test_invalid_utf8_is_replaced():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"
    # A multi-byte character cut by a special token must not swallow the special.
    assert tok.decode([0xC3, 257, 0xA9]) == "\ufffd<|assistant|>\ufffd"


@pytest.mark.parametrize("bad_id", [260, -1, 10_000])
def test_out_of_range_id_raises(bad_id):
    with pytest.raises(ValueError, match=r"outside .*\[0, 260\)"):
        ByteTokenizer().decode([65, bad_id])
