"""Dialogs -> token ids plus the masks the trainer and the evaluator need.

Layout of one dialog of turns t_1..t_k:

    <|src_1|> content_1 <|src_2|> content_2 ... <|src_k|> content_k <|eod|>

Masks are indexed by token position and say what that token is, not what it predicts:
`loss_mask[i]` True means token i is a training target (predicted from token i-1).
`to_training_example` does the one-step shift that pairs inputs with targets.
"""

from __future__ import annotations

import numpy as np

from lmjax.data.tokenizer import ByteTokenizer

LOSS_ON_CHOICES = ("assistant", "all")


def encode_dialog(
    tokenizer: ByteTokenizer,
    dialog: list[dict],
    loss_on: str = "assistant",
    *,
    answer: str | None = None,
) -> dict:
    """Token ids and masks of one dialog.

    loss_on="assistant": targets are every assistant content byte plus the one token after
      each assistant turn (the next turn's header or the final <|eod|>). That last token
      teaches the model when to stop talking or hand over to the tool. Headers that open an
      assistant turn are NOT targets: the generation engine writes them into the prompt.
    loss_on="all": every position except 0 (pure pretraining; nothing predicts token 0).
    answer: the last assistant turn must end with f"{answer}."; `answer_mask` marks exactly
      the answer's bytes (not the period). None or "" leaves `answer_mask` all False.
    `prompt_mask` marks the prompt of a prefix-LM: every token up to and including the header
    of the first assistant turn (what the generation engine prefills). With loss_on="all" or
    without an assistant turn it is empty, so no target is ever visible from the prompt.
    """
    if loss_on not in LOSS_ON_CHOICES:
        raise ValueError(f"Unknown loss_on {loss_on!r}; choose one of: {', '.join(LOSS_ON_CHOICES)}.")
    if not dialog:
        raise ValueError("Cannot encode an empty dialog; it needs at least one turn.")

    tokens: list[int] = []
    is_target: list[bool] = []
    last_assistant_content_end = None  # one past the last byte of the last assistant turn
    for turn_index, turn in enumerate(dialog):
        source = turn["source"]
        if source not in tokenizer.SOURCE_TOKENS:
            valid = ", ".join(tokenizer.SOURCE_TOKENS)
            raise ValueError(f"Turn {turn_index} has unknown source {source!r}; choose one of: {valid}.")
        is_assistant = source == "assistant"
        # The header closes the previous turn, so it is a target iff the previous turn was
        # the assistant's; the content is a target iff this turn is the assistant's.
        previous_was_assistant = turn_index > 0 and dialog[turn_index - 1]["source"] == "assistant"
        tokens.append(tokenizer.SOURCE_TOKENS[source])
        is_target.append(previous_was_assistant)
        content_ids = tokenizer.encode(turn["content"])
        tokens.extend(content_ids)
        is_target.extend([is_assistant] * len(content_ids))
        if is_assistant:
            last_assistant_content_end = len(tokens)
    tokens.append(tokenizer.eod_id)
    is_target.append(dialog[-1]["source"] == "assistant")
    prompt_mask = np.zeros(len(tokens), dtype=bool)
    first_assistant = next((i for i, t in enumerate(dialog) if t["source"] == "assistant"), None)
    if loss_on == "assistant" and first_assistant is not None:
        header_index = sum(1 + len(tokenizer.encode(t["content"])) for t in dialog[:first_assistant])
        prompt_mask[: header_index + 1] = True

    n = len(tokens)
    if loss_on == "all":
        loss_mask = np.ones(n, dtype=bool)
        loss_mask[0] = False
    else:
        loss_mask = np.asarray(is_target, dtype=bool)

    answer_mask = np.zeros(n, dtype=bool)
    if answer:
        if last_assistant_content_end is None:
            raise ValueError(f"Dialog has an answer {answer!r} but no assistant turn to hold it.")
        last_assistant = [t for t in dialog if t["source"] == "assistant"][-1]["content"]
        if not last_assistant.endswith(f"{answer}."):
            raise ValueError(
                f"Last assistant turn {last_assistant!r} does not end with '{answer}.'; "
                f"the answer mask needs the answer right before the final period."
            )
        answer_len = len(tokenizer.encode(answer))
        period_pos = last_assistant_content_end - 1
        answer_mask[period_pos - answer_len : period_pos] = True

    return {
        "tokens": np.asarray(tokens, dtype=np.int32),
        "loss_mask": loss_mask,
        "answer_mask": answer_mask,
        "prompt_mask": prompt_mask,
    }


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
