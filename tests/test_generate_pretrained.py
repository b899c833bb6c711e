"""`python -m lmjax.generate --model PATH`: imported weights (an HF folder, SmolLM2's GGUF) answer
through lmjax's decoder with the model's chat template, streamed; greedy tokens equal
transformers' `generate` on the same files."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from conftest import ROOT, tiny_smollm_folder
from lmjax.interop.bundled import smollm2_gguf

PROMPT = "Once upon a time, in 1999, there"
# transformers builds the GGUF's tokenizer without SmolLM2's digit split (lmjax.data.tokenizers.bpe),
# so the prompt compared against its GGUF loading has no digits.
GGUF_PROMPT = "Once upon a time, there was a"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_smollm_folder(tmp_path_factory.mktemp("tiny_smollm"))


def generate_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "lmjax.generate", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def transformers_greedy(model, tokenizer, prompt, new_tokens):
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.slow  # 17-20 s on two cores: in the slow run, which CI runs too
def test_plain_text_greedy_tokens_equal_transformers_and_stream_prints_the_same_text(tiny_folder):
    out = generate_cli("--model", str(tiny_folder), "--prompt", PROMPT, "--no_chat", "--max_new_tokens", "12", "--json")
    record = json.loads(out.strip().splitlines()[-1])
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_folder)
    expected = transformers_greedy(model, tokenizer, PROMPT, 12)
    n = len(record["tokens"])  # fewer than 12 only when lmjax stopped at the end-of-text token
    assert record["tokens"] == expected[:n] and (n == 12 or expected[n - 1] == tokenizer.eos_token_id)

    streamed = generate_cli("--model", str(tiny_folder), "--prompt", PROMPT, "--no_chat", "--max_new_tokens", "12")
    header, body = streamed.split("\n", 1)
    assert header == f">>> {PROMPT}"
    text_part = body.rsplit("\n[", 1)[0]
    assert text_part == tokenizer.decode([t for t in record["tokens"] if t != tokenizer.eos_token_id])


def test_chat_prompt_uses_the_models_template(tiny_folder):
    from lmjax.generate.api import Generator

    generator = Generator.from_pretrained(tiny_folder, lanes=1, max_len=128)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_folder)
    question = "What is the capital of France?"
    expected = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert generator.prompt_tokens(question) == list(expected)


def test_model_and_workdir_are_exclusive_and_tools_need_a_run(tiny_folder, capsys):
    from lmjax.generate.__main__ import main

    with pytest.raises(SystemExit) as exited:  # argparse's own check: it exits, status 2
        main(["--model", str(tiny_folder), "--workdir", "x", "--prompt", "hi"])
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["--model", str(tiny_folder), "--tools", "facts", "--prompt", "hi"]) == 2
    assert "--tools and --step need a training run" in capsys.readouterr().err
    assert main(["--model", str(tiny_folder / "missing.gguf"), "--prompt", "hi"]) == 2
    assert "is not a .gguf file or a Hugging Face Llama folder" in capsys.readouterr().err


@pytest.mark.slow  # SmolLM2-135M loaded twice (lmjax CLI, transformers) and decoded: ~1.5 min
def test_smollm2_gguf_answers_and_matches_transformers_greedy():
    path = smollm2_gguf()
    answer = generate_cli("--model", path, "--prompt", "What is the capital of France?", "--max_new_tokens", "24", "--lanes", "1")
    assert "Paris" in answer
    out = generate_cli("--model", path, "--prompt", GGUF_PROMPT, "--no_chat", "--max_new_tokens", "16", "--lanes", "1", "--json")
    tokens = json.loads(out.strip().splitlines()[-1])["tokens"]
    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert tokens == transformers_greedy(model, tokenizer, GGUF_PROMPT, 16)[: len(tokens)] and len(tokens) == 16
