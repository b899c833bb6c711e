"""Config errors are one clear line and exit status 2; valid configs load with overrides."""
import subprocess

import pytest

from conftest import ROOT, cli, tiny_facts_config, tiny_facts_recipe
from lmjax.config import parse_config
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
        tiny_facts_config(**overrides)


def test_recipes_share_the_base_defaults_and_keep_their_own():
    """Every recipe starts from base_recipe: sections they do not override hold the section
    dataclasses' defaults, and their own choices survive parsing."""
    from lmjax.config import Checkpoint, Logging, Parallel, load_config_file

    configs = {name: parse_config(load_config_file(ROOT / "configs" / f"{name}.py")) for name in ("facts", "mqar", "shakespeare")}
    for config in configs.values():
        assert config.logging == Logging() and config.parallel == Parallel()
    assert configs["facts"].checkpoint == Checkpoint() and configs["mqar"].checkpoint.every == 500
    assert configs["facts"].optim.clip_norm == 0.0 and configs["mqar"].optim.clip_norm == 1.0
    assert configs["mqar"].model.vocab_size == configs["mqar"].data.vocab_size == 512
    assert configs["mqar"].train.seq_len == configs["mqar"].data.seq_len
    assert configs["shakespeare"].model.tie_embeddings and configs["facts"].eval.recall


@pytest.mark.parametrize(
    "tree_edit, message",
    [
        (lambda t: t["optim"].update(lrr=1.0), "Unknown config key(s) optim.lrr"),
        (lambda t: t["train"].update(steps="10"), "train.steps must be a whole number"),
        (lambda t: t["logging"].update(tensorboard=1), "logging.tensorboard must be True or False"),
        (lambda t: t.update(extra={}), "Unknown config section(s) extra"),
        (lambda t: t.pop("optim"), "no 'optim' section"),
        (lambda t: t["data"].update(name="facs"), "choose one of: facts, mqar, shakespeare"),
        (lambda t: t["eval"].update(batch_size=0), "eval.batch_size must be a positive"),
        (lambda t: t["train"].update(stop_when="eval/qa_acc>0.5"), "train.stop_when must look like"),
    ],
)
def test_parse_rejects_bad_trees_in_one_line(tree_edit, message):
    tree = tiny_facts_recipe().to_dict()
    tree_edit(tree)
    with pytest.raises(ConfigError) as error:
        parse_config(tree)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_json_round_trips_and_fills_keys_added_later(tmp_path):
    """config.json holds every key; an older file without some keys still loads, with defaults."""
    import json

    from lmjax.config import from_json, to_json

    config = tiny_facts_config()
    assert from_json(to_json(config)) == config
    tree = json.loads(to_json(config))
    del tree["eval"]["recall_chunk"], tree["model"]["attention_block"]
    old = from_json(json.dumps(tree))
    assert old.eval.recall_chunk == 16 and old.model.attention_block == 0
