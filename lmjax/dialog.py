"""The chat format: how a dialog becomes tokens and how generated tokens become an answer.

A dialog is a list of turns `{"source": "user" | "assistant" | "database", "content": str}`
(the facts files' format). A `DialogFormat` renders it for one tokenizer family and owns
everything that depends on that rendering:

  * `encode`: token ids plus the loss / answer / prompt masks the trainer and evaluator need,
  * `prompt`: a user question -> the prompt ids that open an assistant turn (what is prefilled),
  * `stop_ids` / `call_id`: the tokens that end a generation, and among them the one by which
    the assistant hands over to the tool,
  * `tool_query` / `tool_reply`: the text of a call, and the tokens the engine writes back,
  * `last_assistant_text`: the text of the final assistant turn of a completion.

`format_for(tokenizer)` picks the format named by the tokenizer's `dialog_format` attribute:
"byte" (`ByteDialog`, the byte tokenizer's specials) or "chatml" (`ChatML`, a real BPE
tokenizer whose chat template is ChatML, SmolLM2's); plain-text tokenizers (Shakespeare's
characters, sentencepiece) have none (None) and get `PlainText`. A new template is a new
subclass registered in `DIALOG_FORMATS`.

How a tool call sits in a dialog: the assistant writes the query as the content of its turn,
the tool's reply is a `database` turn, and the assistant answers in a new turn
(`tool_call_turns`). What the query says (the facts tool's ```` ```sql FIND ... FOR ...``` ````
block) belongs to the tool (lmjax/tools/): the format hands it the turn's text as written.
"""

from __future__ import annotations

import re

import numpy as np

from lmjax.registry import Registry

SOURCES = ("user", "assistant", "database")
TOOL_SOURCE = "database"  # the turn that holds a tool's reply
LOSS_ON_CHOICES = ("assistant", "all")
_WORD_CHAR = re.compile(r"\w")  # letters, digits, underscore (Unicode): what a word boundary separates

DIALOG_FORMATS = Registry("tokenizer.dialog_format")


def answer_is_correct(text: str, answer: str, known_answers=()) -> bool:
    """The recall rule: `text` states the whole answer, `answer`, and a period at its end.

    It ends with f"{answer}." with the start of the text or a non-word character right before
    the answer ("Peru." does not answer "eru"), and no longer answer among `known_answers` (the
    values the text could state, e.g. every value of the asked attribute) ends it the same way:
    with "civil engineer" known, "She works as a civil engineer." states "civil engineer" and
    does not answer "engineer"; "She works as an engineer." does. Without `known_answers` only
    the word boundary is checked, which cannot tell those two apart (a space precedes "engineer"
    in both)."""
    if not _ends_with_whole(text, answer):
        return False
    return not any(len(other) > len(answer) and _ends_with_whole(text, other) for other in known_answers)


def _ends_with_whole(text: str, answer: str) -> bool:
    """`text` ends with f"{answer}." and a word boundary (start of text or non-word character) before it."""
    ending = f"{answer}."
    if not answer or not text.endswith(ending):
        return False
    before = text[: len(text) - len(ending)]
    return not before or _WORD_CHAR.fullmatch(before[-1]) is None


def answer_is_suffix(text: str, answer: str) -> bool:
    """The original codebase's looser rule, kept for comparison (`eval/{set}_recall_suffix`):
    `text` ends with f"{answer}.", whatever comes before ("a civil engineer." answers "engineer")."""
    return text.endswith(f"{answer}.")


def user_question(dialog: list[dict]) -> str:
    """The text of a dialog's first user turn: what a recall question asks."""
    return next(turn["content"] for turn in dialog if turn["source"] == "user")


def tool_call_turns(query: str, reply: str) -> list[dict]:
    """The turns of one tool call: the assistant's query, then the tool's reply."""
    return [{"source": "assistant", "content": query}, {"source": TOOL_SOURCE, "content": reply}]


def format_for(tokenizer) -> "DialogFormat":
    """The dialog format of `tokenizer` (`PlainText` when it names none)."""
    return DIALOG_FORMATS.get(getattr(tokenizer, "dialog_format", None) or "none")(tokenizer)


def encode_dialog(tokenizer, dialog: list[dict], loss_on: str = "assistant", *, answer: str | None = None) -> dict:
    """`format_for(tokenizer).encode(dialog, loss_on, answer=answer)`."""
    return format_for(tokenizer).encode(dialog, loss_on, answer=answer)


def to_training_example(encoded: dict) -> dict:
    """Shift by one: inputs[i] = tokens[i] predicts targets[i] = tokens[i+1]; masks follow targets."""
    tokens = np.asarray(encoded["tokens"], dtype=np.int32)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "loss_mask": np.asarray(encoded["loss_mask"][1:], dtype=np.int32),
        "answer_mask": np.asarray(encoded["answer_mask"][1:], dtype=np.int32),
        # Indexed like inputs: input i is a prompt token.
        "prompt": np.asarray(encoded["prompt_mask"][:-1], dtype=np.int32),
    }


def _prompt_and_loss_masks(n, loss_on, prompt_end, is_target):
    """(prompt_mask, loss_mask) of an n-token dialog: the prompt is everything before
    `prompt_end` (loss_on="assistant" only); the loss is on the targets, or on every position but
    the first with loss_on="all"."""
    prompt_mask = np.zeros(n, dtype=bool)
    if loss_on == "assistant" and prompt_end is not None:
        prompt_mask[:prompt_end] = True
    if loss_on == "all":
        loss_mask = np.ones(n, dtype=bool)
        loss_mask[0] = False
    else:
        loss_mask = np.asarray(is_target, dtype=bool)
    return prompt_mask, loss_mask


def _check_answer_ends(text, answer):
    if not answer_is_correct(text, answer):
        raise ValueError(
            f"Last assistant turn {text!r} does not end with '{answer}.' after a word boundary; "
            f"the answer mask needs the answer right before the final period, after a non-word character."
        )


def _after_last(tokens, token_id) -> list[int]:
    """The tokens after the last `token_id` (all of them when it does not occur)."""
    tokens = list(tokens)
    return tokens[len(tokens) - tokens[::-1].index(token_id):] if token_id in tokens else tokens


class DialogFormat:
    """The interface every format implements; see the module docstring."""

    name: str
    stop_ids: tuple[int, ...] = ()  # end a lane's generation (`call_id` among them)
    call_id: int | None = None  # the assistant hands over to the tool; None: no tool calls

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, dialog: list[dict], loss_on: str = "assistant", *, answer: str | None = None) -> dict:
        """{"tokens", "loss_mask", "answer_mask", "prompt_mask"}, each one entry per token."""
        raise NotImplementedError

    def prompt(self, question: str) -> list[int]:
        """The prompt ids for a user's question."""
        raise NotImplementedError

    def tool_query(self, tokens) -> str:
        """The query of the call that `tokens` end with (their last token is `call_id`)."""
        raise NotImplementedError

    def tool_reply(self, reply: str) -> list[int]:
        """The tokens the engine writes after the call token: the reply, and what resumes the assistant."""
        raise NotImplementedError

    def last_assistant_text(self, tokens) -> str:
        """Text of the final assistant turn of generated `tokens`, without the token that ended it."""
        raise NotImplementedError


@DIALOG_FORMATS.register("none")
class PlainText(DialogFormat):
    """No dialog: a prompt is the plain encoding, nothing stops a generation early, no tools."""

    name = "none"

    def encode(self, dialog, loss_on="assistant", *, answer=None):
        raise ValueError(f"{type(self.tokenizer).__name__} has no dialog format; encode dialogs with a dialog tokenizer (byte, or a BPE one with a ChatML template).")

    def prompt(self, question):
        return list(self.tokenizer.encode(question))

    def last_assistant_text(self, tokens):
        return self.tokenizer.decode(list(tokens))


@DIALOG_FORMATS.register("byte")
class ByteDialog(DialogFormat):
    """Turns opened by the tokenizer's special tokens, the dialog closed by `<|eod|>`:

        <|user|> question <|assistant|> query <|database|> reply <|assistant|> answer <|eod|>

    A generation stops at `<|eod|>`, `<|user|>` or `<|database|>`; the last is a tool call: the
    engine writes the reply and `<|assistant|>`, and the assistant goes on.
    """

    name = "byte"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.header_ids = {source: tokenizer.special_id(source) for source in SOURCES}
        self.eod_id = tokenizer.special_id("eod")
        self.assistant_id = self.header_ids["assistant"]
        self.call_id = self.header_ids[TOOL_SOURCE]
        self.stop_ids = (self.eod_id, self.header_ids["user"], self.call_id)

    def encode(self, dialog, loss_on="assistant", *, answer=None):
        """Token ids and masks of one dialog.

        Masks are indexed by token position and say what that token is, not what it predicts:
        `loss_mask[i]` True means token i is a training target (predicted from token i-1);
        `to_training_example` does the one-step shift that pairs inputs with targets.

        loss_on="assistant": targets are every assistant content token plus the one token after
          each assistant turn (the next turn's header or the final <|eod|>). That last token
          teaches the model when to stop talking or hand over to the tool. Headers that open an
          assistant turn are NOT targets: the generation engine writes them into the prompt.
        loss_on="all": every position except 0 (pure pretraining; nothing predicts token 0).
        answer: the last assistant turn must end with the answer and a period, a word boundary
          before the answer (`answer_is_correct`); `answer_mask` marks exactly the answer's
          tokens (not the period). None or "" leaves it all False.
        `prompt_mask` marks the prompt of a prefix-LM: every token up to and including the header
        of the first assistant turn (what `prompt` gives the engine). With loss_on="all" or
        without an assistant turn it is empty, so no target is ever visible from the prompt.
        """
        if loss_on not in LOSS_ON_CHOICES:
            raise ValueError(f"Unknown loss_on {loss_on!r}; choose one of: {', '.join(LOSS_ON_CHOICES)}.")
        if not dialog:
            raise ValueError("Cannot encode an empty dialog; it needs at least one turn.")

        tokens: list[int] = []
        is_target: list[bool] = []
        prompt_end = None  # one past the header of the first assistant turn
        last_assistant_end = None  # one past the last token of the last assistant turn
        previous = None
        for turn_index, turn in enumerate(dialog):
            source = turn["source"]
            if source not in self.header_ids:
                raise ValueError(f"Turn {turn_index} has unknown source {source!r}; choose one of: {', '.join(SOURCES)}.")
            # The header closes the previous turn, so it is a target iff the previous turn was
            # the assistant's; the content is a target iff this turn is the assistant's.
            tokens.append(self.header_ids[source])
            is_target.append(previous == "assistant")
            if source == "assistant" and prompt_end is None:
                prompt_end = len(tokens)
            content_ids = self.tokenizer.encode(turn["content"])
            tokens.extend(content_ids)
            is_target.extend([source == "assistant"] * len(content_ids))
            if source == "assistant":
                last_assistant_end = len(tokens)
            previous = source
        tokens.append(self.eod_id)
        is_target.append(previous == "assistant")

        n = len(tokens)
        prompt_mask, loss_mask = _prompt_and_loss_masks(n, loss_on, prompt_end, is_target)
        answer_mask = np.zeros(n, dtype=bool)
        if answer:
            if last_assistant_end is None:
                raise ValueError(f"Dialog has an answer {answer!r} but no assistant turn to hold it.")
            last_assistant = [t for t in dialog if t["source"] == "assistant"][-1]["content"]
            _check_answer_ends(last_assistant, answer)
            period_pos = last_assistant_end - 1
            answer_mask[period_pos - len(self.tokenizer.encode(answer)) : period_pos] = True

        return {
            "tokens": np.asarray(tokens, dtype=np.int32),
            "loss_mask": loss_mask,
            "answer_mask": answer_mask,
            "prompt_mask": prompt_mask,
        }

    def prompt(self, question):
        """`<|user|> question <|assistant|>`; no tokens for an empty question."""
        if not question:
            return []
        return [self.header_ids["user"], *self.tokenizer.encode(question), self.assistant_id]

    def tool_query(self, tokens):
        return self.tokenizer.decode(_after_last(list(tokens)[:-1], self.assistant_id))

    def tool_reply(self, reply):
        return [*self.tokenizer.encode(reply), self.assistant_id]

    def last_assistant_text(self, tokens):
        tokens = list(tokens)
        if tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]
        return self.tokenizer.decode(_after_last(tokens, self.assistant_id))


def _check_loss_on(loss_on):
    if loss_on not in LOSS_ON_CHOICES:
        raise ValueError(f"Unknown loss_on {loss_on!r}; choose one of: {', '.join(LOSS_ON_CHOICES)}.")


def _answer_span(text: str, answer: str) -> tuple[int, int]:
    """Character span of `answer` where it ends `text` (right before the final period)."""
    end = len(text) - 1
    return end - len(answer), end


def _token_spans(tokenizer, ids) -> list[tuple[int, int]]:
    """Character span of each token in the decoded text of `ids` (via decoded prefixes; a token
    that splits a character shares its span)."""
    ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends))


@DIALOG_FORMATS.register("chatml")
class ChatML(DialogFormat):
    """ChatML, the template of SmolLM2 (and Qwen) instruct models: every turn is

        <|im_start|>role\ncontent<|im_end|>\n

    with role user, assistant or system. A dialog that does not start with a system turn gets
    the template's default system turn first, read out of the tokenizer's `chat_template` (by
    rendering it, so nothing is hard-coded), as `apply_chat_template` does. A prompt ends with
    `<|im_start|>assistant\n`; a generation stops at `<|im_end|>` or the tokenizer's eos.

    No tool calls in ChatML yet: `call_id` is None, `tool_query` / `tool_reply` raise, and a
    "database" turn is refused.

    Token-for-token, the encoding equals the tokenizer applied to the rendered template, except
    where a turn's content starts with whitespace: the `role\n` header is encoded on its own, so
    a prompt is always a prefix of the encoded dialog (a template rendered as one string may
    merge that "\n" with the whitespace after it).
    """

    name = "chatml"
    ROLES = ("system", "user", "assistant")

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.start_id = tokenizer.special_id("<|im_start|>")
        self.end_id = tokenizer.special_id("<|im_end|>")
        eos = getattr(tokenizer, "eos_id", None)
        self.stop_ids = tuple(dict.fromkeys(i for i in (self.end_id, eos) if i is not None))
        self.call_id = None
        self.newline_ids = list(tokenizer.encode("\n"))
        self.header_ids = {role: [self.start_id, *tokenizer.encode(f"{role}\n")] for role in self.ROLES}
        self.default_system = default_system_prompt(getattr(tokenizer, "chat_template", None))

    def _turns(self, dialog):
        turns = []
        for index, turn in enumerate(dialog):
            role = turn.get("source", turn.get("role"))
            if role == TOOL_SOURCE:
                raise ValueError(f"Turn {index} is a {TOOL_SOURCE!r} turn; ChatML has no tool calls yet.")
            if role not in self.ROLES:
                raise ValueError(f"Turn {index} has unknown source {role!r}; choose one of: {', '.join(self.ROLES)}.")
            turns.append((role, turn["content"]))
        if self.default_system is not None and turns and turns[0][0] != "system":
            turns.insert(0, ("system", self.default_system))
        return turns

    def encode(self, dialog, loss_on="assistant", *, answer=None):
        """Token ids and masks of one dialog (masks say what each token is, as in `ByteDialog.encode`).

        loss_on="assistant": targets are each assistant turn's content and the `<|im_end|>` that
          closes it (the model learns when to stop); headers, the "\n" after `<|im_end|>` and
          every other turn are not. loss_on="all": every position except 0.
        answer: `answer_mask` marks the tokens of the last assistant turn that overlap the answer
          right before its final period (a BPE token may hold a space before it too).
        `prompt_mask`: everything up to and including the first assistant header (`prompt`).
        """
        _check_loss_on(loss_on)
        if not dialog:
            raise ValueError("Cannot encode an empty dialog; it needs at least one turn.")
        tokens: list[int] = []
        is_target: list[bool] = []
        prompt_end = None
        last_content = None  # (start, content ids, text) of the last assistant turn
        for role, content in self._turns(dialog):
            header = self.header_ids[role]
            tokens.extend(header)
            is_target.extend([False] * len(header))
            if role == "assistant" and prompt_end is None:
                prompt_end = len(tokens)
            content_ids = list(self.tokenizer.encode(content))
            if role == "assistant":
                last_content = (len(tokens), content_ids, content)
            tokens.extend(content_ids)
            tokens.append(self.end_id)
            is_target.extend([role == "assistant"] * (len(content_ids) + 1))
            tokens.extend(self.newline_ids)
            is_target.extend([False] * len(self.newline_ids))

        n = len(tokens)
        prompt_mask, loss_mask = _prompt_and_loss_masks(n, loss_on, prompt_end, is_target)
        answer_mask = np.zeros(n, dtype=bool)
        if answer:
            if last_content is None:
                raise ValueError(f"Dialog has an answer {answer!r} but no assistant turn to hold it.")
            start, content_ids, text = last_content
            _check_answer_ends(text, answer)
            a, b = _answer_span(text, answer)
            for offset, (lo, hi) in enumerate(_token_spans(self.tokenizer, content_ids)):
                if lo < b and hi > a:
                    answer_mask[start + offset] = True
        return {
            "tokens": np.asarray(tokens, dtype=np.int32),
            "loss_mask": loss_mask,
            "answer_mask": answer_mask,
            "prompt_mask": prompt_mask,
        }

    def prompt(self, question):
        """[default system turn] `<|im_start|>user\nquestion<|im_end|>\n<|im_start|>assistant\n`;
        no tokens for an empty question."""
        if not question:
            return []
        encoded = self.encode([{"source": "user", "content": question}, {"source": "assistant", "content": ""}])
        return encoded["tokens"][encoded["prompt_mask"]].tolist()

    def tool_query(self, tokens):
        raise NotImplementedError("ChatML has no tool calls yet.")

    def tool_reply(self, reply):
        raise NotImplementedError("ChatML has no tool calls yet.")

    def last_assistant_text(self, tokens):
        """Text after the last `<|im_start|>assistant\n` (all of it without one), without the stop token."""
        tokens = [int(t) for t in tokens]
        if tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]
        header = self.header_ids["assistant"]
        for at in range(len(tokens) - len(header), -1, -1):
            if tokens[at : at + len(header)] == header:
                tokens = tokens[at + len(header) :]
                break
        return self.tokenizer.decode(tokens)


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system message a ChatML `chat_template` adds when a dialog has none (None: it adds none).

    Read by rendering the template (jinja2, sandboxed) for a dialog of one user turn and taking
    the content of the system turn it puts before it."""
    if not chat_template:
        return None
    from lmjax.extras import require

    require("jinja2", "interop")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    marker = "\u0000QUESTION\u0000"
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(chat_template).render(
        messages=[{"role": "user", "content": marker}], add_generation_prompt=False,
        bos_token="", eos_token="",
    )
    before = rendered[: rendered.find("<|im_start|>user\n")]
    opening = "<|im_start|>system\n"
    if opening not in before:
        return None
    body = before[before.index(opening) + len(opening) :]
    return body[: body.index("<|im_end|>")] if "<|im_end|>" in body else body
