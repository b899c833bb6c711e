"""Training probes (lmjax.monitor.probes) against a hand computation: numpy norms of the
parameters before and after the step, and RMS of each block's output captured by Flax's own
`capture_intermediates` (not the `sow` the probes use)."""
import jax
import numpy as np
import pytest
from ml_collections import config_dict

from conftest import ROOT
from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.optim.optimizer import make_optimizer
from lmjax.train.state import init_state_fn
from lmjax.train.step import make_train_step

CFG = TransformerConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden=32, scan_layers=False)
OPTIM = config_dict.ConfigDict(dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=0.0,
                                    schedule="constant", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2, grad_accum=1))


def packed_batch(seed, B=4, L=12):
    """Two sequences per row and padding at the end (segment id 0)."""
    rng = np.random.default_rng(seed)
    segments = np.where(np.arange(L) < 5, 1, np.where(np.arange(L) < 9, 2, 0))
    segment_ids = np.broadcast_to(segments, (B, L)).astype(np.int32).copy()
    positions = np.where(segments == 1, np.arange(L), np.arange(L) - 5) * (segments != 0)
    return {
        "inputs": rng.integers(0, 40, (B, L)).astype(np.int32),
        "targets": rng.integers(0, 40, (B, L)).astype(np.int32),
        "loss_mask": (segment_ids != 0).astype(np.int32),
        "segment_ids": segment_ids,
        "positions": np.broadcast_to(positions, (B, L)).astype(np.int32).copy(),
    }


def run_step(cfg, accum=1, params=None):
    model = Transformer(cfg)
    tx, schedule = make_optimizer(OPTIM, 10)
    state = jax.jit(init_state_fn(model, tx, 12))(jax.random.PRNGKey(0))
    if params is not None:
        state = state.replace(params=params, opt_state=tx.init(params))
    batch = packed_batch(0)
    before = jax.device_get(state)  # the step donates `state`
    new_state, metrics = make_train_step(model.apply, tx, schedule, accum, probes=True)(state, batch)
    return model, before, new_state, batch, {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def flat_step():
    return run_step(CFG)


def test_weight_norms_and_update_ratios_match_numpy(flat_step):
    _, before, after, _, metrics = flat_step
    old, new = before.params, after.params
    for name in ("layer_1/mlp/w_up/kernel", "embed/embedding"):
        w_old, w_new = old, new
        for key in name.split("/"):
            w_old, w_new = w_old[key], w_new[key]
        np.testing.assert_allclose(metrics[f"probe/weight_norm/{name}"], np.linalg.norm(np.asarray(w_new)), rtol=1e-5)
        ratio = np.linalg.norm(np.asarray(w_new) - np.asarray(w_old)) / np.linalg.norm(np.asarray(w_old))
        np.testing.assert_allclose(metrics[f"probe/update_ratio/{name}"], ratio, rtol=1e-3)
    n_leaves = len(jax.tree_util.tree_leaves(old))
    assert sum(k.startswith("probe/weight_norm/") for k in metrics) == n_leaves
    assert sum(k.startswith("probe/update_ratio/") for k in metrics) == n_leaves


def test_activation_rms_matches_captured_block_outputs_over_real_tokens(flat_step):
    model, before, _, batch, metrics = flat_step
    _, captured = model.apply(
        {"params": before.params}, batch["inputs"], batch["positions"], batch["segment_ids"],
        capture_intermediates=lambda module, method: type(module).__name__ == "Block",
    )
    real = batch["segment_ids"] != 0
    for layer in range(CFG.n_layers):
        out = np.asarray(captured["intermediates"][f"layer_{layer}"]["__call__"][0][0])
        expected = np.sqrt(np.mean(np.square(out[real])))
        np.testing.assert_allclose(metrics[f"probe/act_rms/layer_{layer}"], expected, rtol=1e-5)


@pytest.mark.slow  # 29 s
def test_scanned_layers_and_micro_batches_give_the_same_probes(flat_step):
    import dataclasses

    _, before, _, _, flat = flat_step
    stacked = {k: v for k, v in before.params.items() if not k.startswith("layer_")}
    stacked["layers"] = jax.tree_util.tree_map(lambda *x: np.stack(x), *[before.params[f"layer_{i}"] for i in range(2)])
    _, _, _, _, scanned = run_step(dataclasses.replace(CFG, scan_layers=True), params=stacked)
    _, _, _, _, accumulated = run_step(CFG, accum=2)
    probe_keys = sorted(k for k in flat if k.startswith("probe/"))
    assert probe_keys == sorted(k for k in scanned if k.startswith("probe/"))
    for key in probe_keys:
        np.testing.assert_allclose(scanned[key], flat[key], rtol=1e-4, err_msg=key)
        np.testing.assert_allclose(accumulated[key], flat[key], rtol=1e-4, err_msg=key)


@pytest.mark.slow  # 40 s for both
@pytest.mark.parametrize("model", ["mamba", "rnn"])
def test_recurrent_families_report_one_rms_per_layer(model):
    from lmjax.config import load_config_file, parse_config
    from lmjax.models import build_model

    config = parse_config(load_config_file(ROOT / "configs" / "mqar.py", {"implementation.model": model, "model.dim": 16}.items()))
    lm = build_model(config.model)
    tx, schedule = make_optimizer(OPTIM, 10)
    state = jax.jit(init_state_fn(lm, tx, 12))(jax.random.PRNGKey(0))
    batch = packed_batch(1, L=12)
    batch["inputs"] %= config.model.vocab_size
    params = jax.device_get(state.params)  # the step donates `state`
    _, metrics = make_train_step(lm.apply, tx, schedule, probes=True)(state, batch)
    rms = sorted(k for k in metrics if k.startswith("probe/act_rms/"))
    assert rms == [f"probe/act_rms/layer_{i}" for i in range(config.model.n_layers)]
    # Against each block's output captured by Flax (a block returns (x, its state)), over real tokens.
    _, captured = lm.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
        capture_intermediates=lambda module, method: method == "__call__" and (module.name or "").startswith("layer_"),
    )
    real = batch["segment_ids"] != 0
    for layer in range(config.model.n_layers):
        out = captured["intermediates"][f"layer_{layer}"]["__call__"][0]
        out = np.asarray(out[0] if isinstance(out, tuple) else out)
        expected = np.sqrt(np.mean(np.square(out[real])))
        np.testing.assert_allclose(float(metrics[f"probe/act_rms/layer_{layer}"]), expected, rtol=1e-5)
