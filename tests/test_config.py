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
        ({"optim.b1": 1.0}, "optim.b1 must be in [0, 1), got 1.0."),
        ({"optim.b2": float("nan")}, "optim.b2 must be in [0, 1), got nan."),
        ({"optim.eps": 0.0}, "optim.eps must be a positive number, got 0.0."),
        ({"optim.lr": float("nan")}, "optim.lr must be a positive number, got nan."),
        ({"optim.weight_decay": -1e-4}, "optim.weight_decay must be 0 or more, got -0.0001."),
        ({"optim.clip_norm": -1.0}, "optim.clip_norm must be 0 or more (0 = no clipping), got -1.0."),
        ({"optim.warmup_steps": -5}, "optim.warmup_steps must be 0 or more, got -5."),
        ({"optim.min_lr_ratio": -0.1}, "optim.min_lr_ratio must be in [0, 1], got -0.1."),
        ({"optim.decay_fraction": 2.0}, "optim.decay_fraction must be in [0, 1], got 2.0."),
        ({"eval.max_batches": 0}, "eval.max_batches must be a positive number, got 0."),
        ({"eval.recall_lanes": 0}, "eval.recall_lanes must be a positive number, got 0."),
        ({"model.mlp_hidden": 0}, "model.mlp_hidden must be a positive number, got 0."),
        ({"model.norm_eps": 0.0}, "model.norm_eps must be a positive number, got 0.0."),
        ({"model.attention_block": -64}, "model.attention_block must be 0 or more (0 = no block skipping), got -64."),
        ({"implementation.model": "rnn", "model.mlp_hidden": -1}, "model.mlp_hidden must be 0 or more (0 = 3*dim)"),
        ({"data.alpha": 1.5}, "data.alpha must lie in [0, 1], got 1.5."),
        ({"data.alpha": -0.5}, "data.alpha must lie in [0, 1], got -0.5."),
        ({"data.num_unseen": -1}, "data.num_unseen must be a non-negative integer, got -1."),
        ({"data.num_people": 0}, "data.num_people must be a positive integer, got 0."),
        ({"data.num_people": 9999}, "Asked for 9999 + 4 unseen people but only 10000 distinct first x last names exist; lower data.num_people or data.num_unseen."),
        ({"data.seed": -1}, "data.seed must be a non-negative integer, got -1."),
        ({"data.tool_practice_people": -1}, "data.tool_practice_people must be 0 or more (0 = none), got -1."),
        ({"data.mode": "tool", "data.tool_practice_people": 9990},
         "lower data.tool_practice_people to at most 9988."),
    ],
)
def test_validate_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        tiny_facts_config(**overrides)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_stop_when_must_name_a_metric_the_periodic_evaluation_reports():
    from lmjax.config import check_stop_when_names

    periodic, at_end = ["eval/qa_loss", "eval/qa_acc"], ["eval/qa_recall", "time/recall_s"]
    for text in ("", "eval/qa_acc>=0.9", "eval/qa_loss<=0.1", "time/since_start_s>=600"):
        check_stop_when_names(text, "facts", periodic, at_end)
    with pytest.raises(ConfigError) as error:
        check_stop_when_names("eval/qa_accuracy>=0.9", "facts", periodic, at_end)
    assert str(error.value) == (
        "train.stop_when names 'eval/qa_accuracy', which the facts task never reports; it reports: eval/qa_acc, eval/qa_loss."
    )
    with pytest.raises(ConfigError, match="'eval/qa_recall', which the facts task reports only after training; "
                                          "it reports every train.eval_every steps: eval/qa_acc, eval/qa_loss."):
        check_stop_when_names("eval/qa_recall>=0.9", "facts", periodic, at_end)


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


def test_resume_rule_refuses_another_model_and_allows_longer_training():
    from lmjax.config import check_resume_compatible

    saved = tiny_facts_config(**{"train.steps": 4})
    with pytest.raises(ConfigError, match=r"model.dim \(32 -> 64\)"):
        check_resume_compatible(saved, tiny_facts_config(**{"train.steps": 4, "model.dim": 64}))
    with pytest.raises(ConfigError, match=r"optim.lr"):
        check_resume_compatible(saved, tiny_facts_config(**{"train.steps": 4, "optim.lr": 1.0}))
    check_resume_compatible(saved, tiny_facts_config(**{"train.steps": 6, "train.log_every": 3, "checkpoint.every": 2}))


@pytest.mark.parametrize("overrides,message", [
    ({"data.mode": "bio", "eval.recall": True}, "data.mode=bio measures recall teacher-forced"),
    ({"data.mode": "tool", "data.stored_bits": True}, "data.stored_bits counts facts held in the weights"),
])
def test_facts_bio_and_stored_bits_mistakes_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(tiny_facts_recipe(**overrides))
