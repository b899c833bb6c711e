"""`RequestEvaluator`: answers evaluation requests (lmjax.eval.requests) with one model.

Teacher-forced requests (Loglikelihood, Rolling) become pieces, token sequences scored from some
index on; pieces are packed first-fit into rows of `seq_len` tokens with segment ids (attention
and RoPE restart in each, as in training), and batches have fixed shapes [rows, seq_len] (a
short last batch: the next power of two of rows), so one jitted forward serves them all. GenerateUntil requests go through the lane engine
(lmjax.generate), greedily, with the request's tool attached.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lmjax.eval.requests import GenerateUntil, Generated, Loglikelihood, Rolling, Score, cut_at_stop


@dataclasses.dataclass(frozen=True)
class Piece:
    """`tokens[1:]` predicted from `tokens[:-1]`; targets from index `scored_from` of tokens[1:] on count."""

    request: int
    tokens: tuple
    scored_from: int
    prompt: int = 0  # leading input tokens of a prefix-LM prompt


def loglikelihood_piece(index: int, request: Loglikelihood, seq_len: int) -> Piece:
    n_cont = len(request.continuation)
    if n_cont > seq_len:
        raise ValueError(f"A continuation of {n_cont} tokens does not fit the evaluator's window of {seq_len}; raise seq_len.")
    full = request.context + request.continuation
    tokens = full[-(seq_len + 1):]  # the oldest context goes first
    return Piece(index, tokens, len(tokens) - 1 - n_cont, max(0, request.prompt - (len(full) - len(tokens))))


def rolling_pieces(index: int, request: Rolling, seq_len: int) -> list[Piece]:
    """Windows predicting disjoint spans of at most `seq_len` tokens, each given as many earlier
    tokens as fill the row (the harness's rolling windows with context_len=1)."""
    seq = ((request.prefix,) if request.prefix is not None else ()) + request.tokens
    pieces, first = [], 1  # seq[first:stop] are the targets of the next window
    while first < len(seq):
        stop = min(len(seq), first + seq_len)
        start = max(0, stop - 1 - seq_len)  # the row holds seq[start:stop]: stop - 1 - start <= seq_len inputs
        pieces.append(Piece(index, seq[start:stop], first - 1 - start))
        first = stop
    return pieces


def pack(pieces: list[Piece], seq_len: int) -> list[list[Piece]]:
    """Rows of pieces, first fit in decreasing length (deterministic: ties keep their order)."""
    rows, free = [], []
    for piece in sorted(pieces, key=lambda p: -len(p.tokens)):
        need = len(piece.tokens) - 1
        for i, room in enumerate(free):
            if room >= need:
                rows[i].append(piece)
                free[i] -= need
                break
        else:
            rows.append([piece])
            free.append(seq_len - need)
    return rows


def row_arrays(row: list[Piece], seq_len: int) -> dict:
    """One packed row: inputs, targets, scored mask, segment ids (1, 2, ...), positions, prompt."""
    out = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "scored", "segment_ids", "positions", "prompt")}
    at = 0
    for segment, piece in enumerate(row, 1):
        n = len(piece.tokens) - 1
        span = slice(at, at + n)
        out["inputs"][span] = piece.tokens[:-1]
        out["targets"][span] = piece.tokens[1:]
        out["scored"][at + piece.scored_from: at + n] = 1
        out["prompt"][at: at + piece.prompt] = 1
        out["segment_ids"][span] = segment
        out["positions"][span] = np.arange(n)
        at += n
    return out


def make_score_step(apply_fn, *, layout=None, param_shardings=None):
    """Jitted (params, batch) -> per-token log-probability of the targets and whether each is the argmax."""

    def score(params, batch):
        logits = apply_fn({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"], batch["prompt"])
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target_logprob = jnp.take_along_axis(logprobs, batch["targets"][..., None], axis=-1)[..., 0]
        greedy = jnp.argmax(logits, axis=-1) == batch["targets"]
        return {"logprob": target_logprob, "greedy": greedy}

    if layout is None:
        return jax.jit(score)
    jitted = layout.jit(score, in_shardings=(param_shardings, layout.rows()), out_shardings=layout.replicated)
    return lambda params, batch: jitted(params, layout.put_rows(batch))


class RequestEvaluator:
    """Answers requests with `model` at `params`; reuse one across tasks (it compiles once per shape)."""

    def __init__(self, model, params, tokenizer, *, seq_len: int, rows: int = 16, layout=None, param_shardings=None,
                 lanes: int = 16, chunk: int = 16, gen_len: int | None = None, progress: bool = False):
        """`seq_len`: tokens in a teacher-forced row (the longest window); `rows`: rows a batch;
        `lanes`, `chunk`, `gen_len` (cache length, default seq_len): the generation engine's."""
        if layout is not None:
            layout.check_rows(rows, "rows")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.seq_len, self.rows, self.layout = seq_len, rows, layout
        self.lanes, self.chunk, self.gen_len = lanes, chunk, gen_len or seq_len
        self.progress = progress
        self._score = make_score_step(model.apply, layout=layout, param_shardings=param_shardings)
        self._generators = {}

    # -- all kinds ------------------------------------------------------------------------------------

    def answer(self, requests: list) -> list:
        """One answer per request, in order: Score for Loglikelihood and Rolling, Generated for GenerateUntil."""
        answers = [None] * len(requests)
        scored = [i for i, r in enumerate(requests) if isinstance(r, (Loglikelihood, Rolling))]
        generated = [i for i, r in enumerate(requests) if isinstance(r, GenerateUntil)]
        unknown = [type(r).__name__ for r in requests if not isinstance(r, (Loglikelihood, Rolling, GenerateUntil))]
        if unknown:
            raise TypeError(f"Not an evaluation request: {unknown[0]} (see lmjax.eval.requests).")
        for i, answer in zip(scored, self.score([requests[i] for i in scored])):
            answers[i] = answer
        for i, answer in zip(generated, self.generate([requests[i] for i in generated])):
            answers[i] = answer
        return answers

    # -- teacher-forced -------------------------------------------------------------------------------

    def score(self, requests: list) -> list[Score]:
        """Scores of Loglikelihood and Rolling requests, in order."""
        pieces = []
        for i, request in enumerate(requests):
            if isinstance(request, Loglikelihood):
                pieces.append(loglikelihood_piece(i, request, self.seq_len))
            else:
                pieces.extend(rolling_pieces(i, request, self.seq_len))
        logprob = np.zeros(len(requests), np.float64)
        counts = np.zeros((len(requests), 2), np.int64)  # scored, greedy
        rows = pack(pieces, self.seq_len)
        batches = range(0, len(rows), self.rows)
        for start in tqdm(batches, desc="scoring", disable=not self.progress or len(batches) < 2, leave=False):
            chunk = rows[start: start + self.rows]
            arrays = [row_arrays(row, self.seq_len) for row in chunk]
            arrays += [row_arrays([], self.seq_len)] * (self._bucket(len(chunk)) - len(chunk))
            batch = {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}
            out = jax.device_get(self._score(self.params, {k: v for k, v in batch.items() if k != "scored"}))
            for r, row in enumerate(chunk):
                at = 0
                for piece in row:
                    n = len(piece.tokens) - 1
                    span = slice(at + piece.scored_from, at + n)
                    logprob[piece.request] += float(np.sum(out["logprob"][r, span], dtype=np.float64))
                    counts[piece.request] += (n - piece.scored_from, int(np.sum(out["greedy"][r, span])))
                    at += n
        return [Score(float(lp), int(c[0]), int(c[1])) for lp, c in zip(logprob, counts)]

    def _bucket(self, n: int) -> int:
        """Rows of a batch holding `n` real ones: a power of two up to `rows` (so a short last
        batch, or a handful of requests, costs at most one compile per power of two), a multiple
        of the mesh's data axis."""
        bucket = min(1 << (n - 1).bit_length(), self.rows)
        if self.layout is not None:
            data = self.layout.mesh.shape["data"]
            bucket = -(-bucket // data) * data
        return bucket

    # -- generation -----------------------------------------------------------------------------------

    def _generator(self, tool):
        key = id(tool)
        if key not in self._generators:
            from lmjax.generate.api import Generator

            self._generators[key] = (tool, Generator(
                self.model, self.params, self.tokenizer, lanes=self.lanes, max_len=self.gen_len, chunk=self.chunk,
                tool=tool, layout=self.layout,
            ))
        return self._generators[key][1]

    def generate(self, requests: list[GenerateUntil]) -> list[Generated]:
        """Greedy completions, in order; requests sharing a tool share a generator."""
        from lmjax.generate.engine import Request

        answers = [None] * len(requests)
        by_tool = {}
        for i, request in enumerate(requests):
            by_tool.setdefault(id(request.tool), []).append(i)
        for indices in by_tool.values():
            generator = self._generator(requests[indices[0]].tool)
            engine_requests = []
            for i in indices:
                r = requests[i]
                # The newest context that leaves a slot to generate into; a generation that fills
                # the cache ends there (finish reason cache_full), as the trainer's recall does.
                engine_requests.append(Request(list(r.context[-(self.gen_len - 1):]), max_new_tokens=r.max_new_tokens, id=i))
            for completion in generator.engine.generate(engine_requests, progress=self.progress):
                r = requests[completion.id]
                text, stopped = cut_at_stop(completion.text, r.until)
                answers[completion.id] = Generated(
                    text, list(completion.tokens), list(completion.tool_calls),
                    "until" if stopped else completion.finish_reason, completion,
                )
        return answers


@dataclasses.dataclass
class Subject:
    """What is evaluated: a training run's checkpoint or imported weights."""

    model: Any
    params: Any
    tokenizer: Any
    config: Any = None  # the run's RunConfig (None for imported weights)
    workdir: Any = None
    step: int = 0
    task: Any = None  # lmjax.run_dir.RunTask of a run (facts: data folder, recall sets)
    source: str = ""  # the workdir or weights path

    def evaluator(self, *, seq_len=None, rows=16, lanes=None, chunk=None, progress=False, layout=None, param_shardings=None):
        """A RequestEvaluator for this subject: by default the run's train.seq_len, eval.recall_lanes
        and eval.recall_chunk (so generation matches the trainer's own recall)."""
        c = self.config
        return RequestEvaluator(
            self.model, self.params, self.tokenizer, seq_len=seq_len or (c.train.seq_len if c else 1024), rows=rows,
            lanes=lanes or (c.eval.recall_lanes if c else 16), chunk=chunk or (c.eval.recall_chunk if c else 16),
            layout=layout, param_shardings=param_shardings, progress=progress,
        )


def load_subject(*, workdir=None, step=None, pretrained=None) -> Subject:
    """A run's checkpoint (`workdir`, `step`: default the newest intact one) or imported weights
    (`pretrained`: a .gguf file or a Hugging Face Llama folder), on the default device."""
    if (workdir is None) == (pretrained is None):
        raise ValueError("Evaluate either a run (--workdir) or imported weights (--model), not both or neither.")
    if pretrained is not None:
        from lmjax.interop.pretrained import load_pretrained
        from lmjax.models import build_model

        loaded = load_pretrained(pretrained)
        return Subject(build_model(loaded.config), loaded.params, loaded.tokenizer, source=str(pretrained))
    from lmjax.run_dir import restore_params, run_task

    config, model, params, restored_step = restore_params(workdir, step)
    task = run_task(config, workdir)
    return Subject(model, params, task.tokenizer, config, workdir, int(restored_step), task, str(workdir))
