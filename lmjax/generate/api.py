"""`Generator`: text in, completions out, over the lane engine (the Python API)."""
from __future__ import annotations

from typing import Sequence

import jax

from lmjax.dialog import format_for
from lmjax.generate.decoder import Decoder
from lmjax.generate.engine import LaneEngine, Request
from lmjax.tools import TOOLS


class Generator:
    """Holds a compiled decoder for (lanes, max_len, chunk); reuse it across calls."""

    def __init__(self, model, params, tokenizer, *, lanes=8, max_len=256, chunk=16, tool=None, tool_timeout_s=5.0, layout=None,
                 quantize=None, page_size=0, n_pages=0):
        """`tool`: query text -> reply text, called in a thread per call; a call that takes longer
        than `tool_timeout_s` seconds is answered `error: the tool timed out ...` and its lane
        goes on. `layout`: generate on a mesh (lanes over `data`, kv heads over `model`);
        `params` must be laid out on it (see `from_workdir`). `quantize`: weight-only
        round-to-nearest quantization first, e.g. "int8" or "int4-g64" (lmjax.quant; GPTQ needs
        calibration data: quantize with lmjax.quant.quantize.quantize_params and pass the result);
        `from_pretrained` also takes "gguf": a GGUF's Q8_0/Q4_0/Q4_1 blocks kept as stored.
        `page_size` (transformers): a paged KV cache of `n_pages` pages (default: the memory of
        lanes * max_len slots) whose common prompt prefixes are shared (lmjax.generate.pages)."""
        if quantize:
            from lmjax.quant.quantize import param_shardings, put_params, quantize_params

            params = quantize_params(model, params, quantize)
            if layout is not None:
                params = put_params(params, param_shardings(model, params, layout))
        self.tokenizer = tokenizer
        self.task_info = {}
        self.format = format_for(tokenizer)  # lmjax.dialog: prompts, stop tokens, tool calls
        decoder = Decoder(
            model, lanes, max_len, stop_ids=self.format.stop_ids, chunk=chunk, sample_vocab=tokenizer.vocab_size, layout=layout,
            page_size=page_size, n_pages=n_pages,
        )
        self.engine = LaneEngine(decoder, params, tokenizer, tool=tool, tool_timeout_s=tool_timeout_s, dialog_format=self.format)

    @classmethod
    def from_workdir(cls, workdir, *, step=None, tools=None, max_len=None, layout=None, **options):
        """A generator for a training run's checkpoint; `tools="facts"` attaches its database.
        With a `layout`, the parameters are restored straight onto its mesh."""
        from lmjax.generate.load import load_run
        from lmjax.run_dir import require_facts_data

        make_tool = TOOLS.get(tools) if tools else None  # an unknown name fails before the restore
        config, model, params, task = load_run(workdir, step, layout=layout)
        tool = None
        if make_tool is not None:
            if task.name != "facts":
                raise ValueError(f"The {tools!r} tool needs a facts run; {str(workdir)!r} trained on {task.name!r}.")
            tool = make_tool(require_facts_data(config, workdir))
        generator = cls(
            model, params, task.tokenizer, max_len=max_len or config.train.seq_len, tool=tool, layout=layout, **options
        )
        generator.task_info = task.info  # facts: the data folder and its recall sets
        return generator

    @classmethod
    def from_pretrained(cls, path, *, max_len=1024, layout=None, **options):
        """A generator for imported weights: a GGUF file or a Hugging Face Llama folder
        (lmjax.interop.pretrained), with their tokenizer and its chat template."""
        from lmjax.interop.pretrained import load_pretrained
        from lmjax.models import build_model

        keep_blocks = options.get("quantize") == "gguf"  # the file's own int8/int4 blocks, as stored
        if keep_blocks:
            options.pop("quantize")
        pretrained = load_pretrained(path, gguf_blocks=keep_blocks)
        params = pretrained.params
        model = build_model(pretrained.config)
        if keep_blocks and layout is not None:
            from lmjax.quant.quantize import param_shardings, put_params

            params = put_params(params, param_shardings(model, params, layout))
        elif layout is not None:
            from lmjax.run_dir import abstract_params

            shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract_params(model, 8, layout))
            params = layout.put_params(params, shardings)
        return cls(model, params, pretrained.tokenizer, max_len=max_len, layout=layout, **options)

    def prompt_tokens(self, prompt: str | Sequence[int], chat: bool = True) -> list[int]:
        """Token ids as given, or for text the dialog format's prompt: a user turn opening an
        assistant turn (dialog and chat models), the plain encoding otherwise or with `chat=False`."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        return self.format.prompt(prompt) if chat else list(self.tokenizer.encode(prompt))

    def generate(self, prompts, *, progress=False, seed=0, chat=True, on_tokens=None, **sampling):
        """Completions (tokens, text, finish reason, tool calls) for a list of prompts.

        `sampling`: max_new_tokens, temperature, top_k, top_p, min_p (the same for all prompts);
        prompt i samples with seed `seed + i`. `chat=False`: text prompts are continued as they
        are, without the chat template. `on_tokens(i, ids)`: called as prompt i gains tokens.
        """
        requests = [Request(self.prompt_tokens(p, chat), seed=seed + i, id=i, **sampling) for i, p in enumerate(prompts)]
        return self.engine.generate(requests, progress=progress, on_tokens=on_tokens)
