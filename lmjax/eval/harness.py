"""lmjax models in EleutherAI's lm-evaluation-harness (`pip install 'lmjax[harness]'`).

Importing this module registers the model "lmjax" with the harness:

    from lmjax.eval.harness import run_harness
    run_harness("workdir=runs/facts,max_length=256", task_dir=None, tasks=["lambada_openai"])
    run_harness("pretrained=SmolLM2.gguf,max_length=512,batch_size=8", "my_tasks/", ["my_task"])

or the harness's own CLI with lmjax registered:

    python -m lmjax.eval.harness --model lmjax --model_args workdir=W,step=1000 --tasks hellaswag

Model args: `workdir` (+ `step`, default the newest) of a training run, or `pretrained` (a .gguf
file or a Hugging Face Llama folder); `max_length`: tokens of the window (default the run's
train.seq_len, else 1024); `batch_size`: rows of a teacher-forced batch; `lanes`: generation lanes.

The harness's three request kinds become lmjax's (lmjax.eval.requests), answered by one
RequestEvaluator, and follow the harness's `hf` backend: a continuation with an empty context is
scored after `prefix_token_id` (BOS when the tokenizer has one, else end-of-text), perplexities
score every token after that prefix in windows of `max_length`, a context that does not fit loses
its oldest tokens, and generation is greedy, stops at end-of-text or `until`, and leaves room in
the window for `max_gen_toks` new tokens. Texts are encoded without added special tokens, and
special-token strings inside a text stay text.
"""
from __future__ import annotations

from lmjax.extras import require

require("lm_eval", "harness")

from lm_eval.api.model import LM, TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs  # noqa: E402

from lmjax.eval.requests import GenerateUntil, Loglikelihood, Rolling, cut_at_stop  # noqa: E402

DEFAULT_ROWS = 16
DEFAULT_MAX_GEN_TOKS = 256  # the hf backend's default when a task sets none


@register_model("lmjax")
class LmjaxLM(TemplateLM):
    """The harness's LM interface over `lmjax.eval.evaluator.RequestEvaluator`."""

    def __init__(self, workdir=None, step=None, pretrained=None, max_length=None, batch_size=None, lanes=None,
                 progress=False, device=None, max_batch_size=None, *, evaluator=None):
        """Either a run (`workdir`, `step`) or weights (`pretrained`), or a ready `evaluator` (a
        RequestEvaluator, whose `seq_len` is then the window). `device`, `max_batch_size`: what
        the harness passes every backend; lmjax uses JAX's default device and fixed batches."""
        super().__init__()
        if evaluator is None:
            from lmjax.eval.evaluator import load_subject

            subject = load_subject(workdir=workdir, step=None if step in (None, "") else int(step), pretrained=pretrained)
            evaluator = subject.evaluator(
                seq_len=int(max_length) if max_length else None, rows=_rows(batch_size),
                lanes=int(lanes) if lanes else None, progress=bool(progress),
            )
        self.evaluator = evaluator
        self.lmjax_tokenizer = evaluator.tokenizer  # not `tokenizer`: the harness reads that as a HF tokenizer
        if self.eot_token_id is None:
            raise ValueError("The model's tokenizer has no end-of-text (eos) token, which the harness needs.")
        special = getattr(self.lmjax_tokenizer, "special_tokens", None) or {}
        self._special_ids = frozenset(special.values())

    # -- what the harness asks of every model ------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.lmjax_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """Scored texts start after this token: BOS if there is one, else end-of-text (as `hf`)."""
        bos = getattr(self.lmjax_tokenizer, "bos_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.evaluator.seq_len

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self.evaluator.rows

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        ids = list(self.lmjax_tokenizer.encode(string))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in self._special_ids]
        return self.lmjax_tokenizer.decode(tokens)

    # -- the three request kinds -------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """[((context, continuation), context ids, continuation ids)] -> [(log p, greedy?)]."""
        scores = self.evaluator.answer([Loglikelihood(ctx, cont) for _, ctx, cont in requests])
        answers = [(score.logprob, score.greedy) for score in scores]
        for (strings, _, _), answer in zip(requests, answers):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole texts, every token scored (the first after `prefix_token_id`)."""
        texts = [request.args[0] for request in requests]
        encoded = [self.tok_encode(text) for text in texts]
        asked = [i for i, ids in enumerate(encoded) if ids]  # an empty text has log-likelihood 0
        scores = self.evaluator.answer([Rolling(encoded[i], prefix=self.prefix_token_id) for i in asked])
        logprobs = [0.0] * len(texts)
        for i, score in zip(asked, scores):
            logprobs[i] = score.logprob
        for text, logprob in zip(texts, logprobs):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), logprob)
        return logprobs

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first stop string (end-of-text is always one)."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        asks, stops = [], []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs or {}, self.max_gen_toks)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
                raise ValueError(
                    f"lmjax's harness model generates greedily only; this task asks for do_sample="
                    f"{kwargs.get('do_sample')}, temperature={kwargs.get('temperature')} (set do_sample: false)."
                )
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            max_gen_toks = int(kwargs["max_gen_toks"])
            room = self.max_length - max_gen_toks  # as hf: the newest context that leaves room for max_gen_toks
            if room <= 0:
                raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a context in max_length={self.max_length}; raise max_length.")
            ids = self.tok_encode(context, left_truncate_len=room) or [self.prefix_token_id]
            asks.append(GenerateUntil(ids, until=until, max_new_tokens=max_gen_toks))
            stops.append(until)
        texts = []
        for request, generated, until in zip(requests, self.evaluator.answer(asks), stops):
            # As the hf backend: the text of the generated tokens without special tokens, cut at `until`.
            text = cut_at_stop(self.tok_decode(generated.tokens), until)[0]
            texts.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


def _rows(batch_size) -> int:
    """Rows of a batch from the harness's batch_size (an int, a digit string, "auto" or None)."""
    if batch_size in (None, "", "auto") or str(batch_size).startswith("auto"):
        return DEFAULT_ROWS
    return int(batch_size)


def run_harness(model_args, task_dir=None, tasks=(), limit=None, **options) -> dict:
    """`lm_eval.simple_evaluate` on `tasks`, names from the task YAML files of `task_dir` or the
    harness's own (indexed only when some task is not in `task_dir`: that takes ~10 s).
    `model_args`: "workdir=W,step=S,max_length=N" (or a dict) for lmjax's model, or a model object
    (a LmjaxLM, or any of the harness's, e.g. its hf backend to compare with). `options`: more
    simple_evaluate arguments (log_samples, num_fewshot, ...); stderr bootstraps are off unless
    `bootstrap_iters` says otherwise. Returns the harness's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    task_manager = None
    if task_dir:
        task_manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        if not set(tasks) <= set(task_manager.all_tasks):
            task_manager = TaskManager(include_path=str(task_dir))
    options.setdefault("bootstrap_iters", 0)
    if isinstance(model_args, LM):
        model, model_args = model_args, None
    else:
        model = "lmjax"
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, limit=limit, task_manager=task_manager, **options
    )


if __name__ == "__main__":  # the harness's CLI, with "lmjax" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
