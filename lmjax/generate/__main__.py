"""python -m lmjax.generate --workdir W --prompt "When was Jana Wagner born?" [--tools facts] [--tool_timeout_s 5]
python -m lmjax.generate --model SmolLM2.gguf|HF_FOLDER --prompt "What is the capital of France?" [--no_chat]

Prints each completion after its prompt (one prompt: token by token, as it is decoded); `--json`
prints one JSON object per prompt instead. `--prompts FILE.jsonl`: one object per line with
"prompt" (text) or a facts "dialog" (its first user turn is the prompt). Text prompts go through
the model's chat template (ChatML for SmolLM2, lmjax's dialog tokens for facts runs) unless
`--no_chat`, which continues them as plain text.
"""
import json
import sys

from lmjax import cli
from lmjax.xla_flags import tune_xla_cpu_flags

PROG = "lmjax.generate"


def parse_args(argv):
    p = cli.ArgumentParser(prog="lmjax.generate", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a training run folder (its latest checkpoint is used)")
    source.add_argument("--model", help="imported weights: a GGUF file or a Hugging Face Llama folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest intact one)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="JSONL file of prompts")
    p.add_argument("--tools", default=None, help="tool to execute mid-generation: facts")
    p.add_argument("--tool_timeout_s", type=float, default=5.0,
                   help="seconds a tool call may take; a later reply is 'error: the tool timed out ...'")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min_p", type=float, default=0.0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lanes", type=int, default=8)
    p.add_argument("--max_len", type=int, default=None, help="cache slots per lane (default: train.seq_len; --model: 1024)")
    p.add_argument("--quantize", default=None,
                   help="weight-only quantization: int8, int4-g64, ...; with a GGUF --model also 'gguf' (its Q8_0/Q4_0/Q4_1 blocks as stored)")
    p.add_argument("--no_chat", action="store_true", help="continue text prompts as they are, without the chat template")
    p.add_argument("--mesh", default=None, help="DATAxMODEL devices, e.g. 4x2 (lanes over data, kv heads over "
                   "model); default: one device")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    return p.parse_args(argv)


def read_prompts(path):
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "prompt" in record:
                prompts.append(record["prompt"])
            elif "dialog" in record:
                prompts.append(next(t["content"] for t in record["dialog"] if t["source"] == "user"))
            else:
                raise ValueError(f"{path}:{n} has neither 'prompt' nor 'dialog'.")
    return prompts


def mesh_layout(text):
    """'4x2' -> a Layout of 4 data x 2 model devices; None -> None (one device)."""
    if text is None:
        return None
    from lmjax.parallel.layout import Layout

    try:
        data, model = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--mesh must look like DATAxMODEL (e.g. 4x2 or -1x1), got {text!r}.") from None
    return Layout.from_devices(data, model)


def main(argv=None) -> int:
    return cli.run(PROG, parse_args, generate, argv)


def generate(args) -> int:
    tune_xla_cpu_flags()
    from lmjax.generate.api import Generator
    from lmjax.generate.engine import check_tool_timeout

    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise ValueError("Give --prompt TEXT or --prompts FILE.jsonl.")
    check_tool_timeout(args.tool_timeout_s)  # before the restore: a bad value costs nothing
    options = dict(lanes=args.lanes, layout=mesh_layout(args.mesh), tool_timeout_s=args.tool_timeout_s, quantize=args.quantize)
    if args.quantize == "gguf" and not args.model:
        raise ValueError("--quantize gguf keeps a GGUF file's quantized blocks: it needs --model FILE.gguf.")
    if args.model:
        if args.tools or args.step is not None:
            raise ValueError("--tools and --step need a training run (--workdir), not --model.")
        generator = Generator.from_pretrained(args.model, max_len=args.max_len or 1024, **options)
    else:
        generator = Generator.from_workdir(args.workdir, step=args.step, tools=args.tools, max_len=args.max_len, **options)
    stream = len(prompts) == 1 and not args.json
    if stream:
        print(f">>> {prompts[0]}", flush=True)
    completions = generator.generate(
        prompts, seed=args.seed, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, progress=len(prompts) > 1 and not args.json,
        chat=not args.no_chat, on_tokens=stream_printer(generator) if stream else None,
    )
    for prompt, c in zip(prompts, completions):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason, "tool_calls": c.tool_calls}))
        elif stream:
            print(f"\n[{c.finish_reason}, {len(c.tool_calls)} tool call(s)]\n")
        else:
            print(f">>> {prompt}\n{c.text}\n[{c.finish_reason}, {len(c.tool_calls)} tool call(s)]\n")
    return 0


def stream_printer(generator):
    """Prints the completion as it comes, without the tokens that end it (a tool call's stays)."""
    fmt = generator.format
    return TextStream(generator.tokenizer, set(fmt.stop_ids) - {fmt.call_id})


class TextStream:
    """Prints one completion's text as its tokens arrive, without the tokens that end it. Tokens
    are decoded together and only the new text is printed, so a character split over several
    tokens prints once, whole."""

    def __init__(self, tokenizer, stop_ids=(), out=None):
        self.tokenizer, self.stop_ids, self.tokens, self.printed = tokenizer, set(stop_ids), [], ""
        self.out = out or sys.stdout  # looked up now, not at import: tests and notebooks swap sys.stdout

    def __call__(self, index, new_tokens):
        self.tokens.extend(t for t in new_tokens if t not in self.stop_ids)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 character: wait for the rest of it
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


if __name__ == "__main__":
    sys.exit(main())
