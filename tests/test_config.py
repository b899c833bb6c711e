"""Config errors are one clear line and exit status 2; valid configs load with overrides."""
import subprocess

import pytest

from conftest import ROOT, cli, tiny_facts_config
from lmjax.config import validate
from lmjax.registry import ConfigError

FACTS = "--config=" + str(ROOT / "configs" / "facts.py")


def run_cli(args, env, tmp_path):
    return subprocess.run(cli(*args, f"--workdir={tmp_path / 'w'}"), env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, expected",
    [
        ([FACTS, "--config.model.dimm=3"], ["Unknown config key 'model.dimm'", "dim", "n_heads"]),
        ([FACTS, "--config.modle.dim=3"], ["Unknown config key 'modle.dim'", "model"]),
        ([FACTS, "--config.model.dim=abc"], ["--config.model.dim=abc", "int"]),
        ([FACTS, "--config.implementation.model=transfomer"], ["implementation.model", "transformer"]),
        ([FACTS, "--config.data.mode=both"], ["data.mode", "weights, tool"]),
        ([FACTS, "--config.implementation.profiler=perf"], ["implementation.profiler", "none"]),
        (["--config=configs/nope.py"], ["does not exist"]),
    ],
)
def test_cli_errors_are_one_line(args, expected, subprocess_env, tmp_path):
    result = run_cli(args, subprocess_env, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lmjax: error:"), result.stderr
    for text in expected:
        assert text in lines[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.n_heads": 3}, "n_heads"),
        ({"model.n_kv_heads": 2, "model.n_heads": 3, "model.dim": 36}, "multiple of model.n_kv_heads"),
        ({"train.steps": 0}, "train.steps must be a positive"),
        ({"optim.schedule": "exp"}, "choose one of: constant, cosine, linear, wsd"),
        ({"model.compute_dtype": "float16"}, "model.compute_dtype"),
        ({"model.vocab_size": 100}, "vocab_size"),
        ({"optim.grad_accum": 3}, "divisible by optim.grad_accum"),
    ],
)
def test_validate_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(tiny_facts_config(**overrides))


def test_required_key_names_exist():
    config = tiny_facts_config()
    for key in ("seed", "train.steps", "train.batch_size", "train.seq_len", "train.log_every", "train.eval_every",
                "checkpoint.every", "data.mode", "data.num_people", "model.dim", "model.n_layers", "model.n_heads"):
        node = config
        for part in key.split("."):
            node = node[part]
    validate(config)
