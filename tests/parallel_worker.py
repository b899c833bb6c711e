"""Runs the parallel-layout cases in a subprocess and prints one JSON object of results.

tests/test_parallel.py starts it twice: with 8 simulated CPU devices (XLA_FLAGS set by the
caller, before jax starts) for the meshes, and with one device for the reference run. This
script only records what happened; every assertion lives in the test.
"""
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_facts_config  # noqa: E402
from test_decoder import decode_all  # noqa: E402

from lmjax.generate.decoder import Decoder  # noqa: E402
from lmjax.models import build_model  # noqa: E402
from lmjax.parallel.layout import Layout  # noqa: E402
from lmjax.run_dir import Checkpointer  # noqa: E402
from lmjax.optim.optimizer import make_optimizer  # noqa: E402
from lmjax.train.loop import train  # noqa: E402
from lmjax.train.state import abstract_train_state, init_state_fn, param_shardings, state_shardings  # noqa: E402

MESHES = {"8x1": (8, 1, False), "4x2": (4, 2, False), "2x4": (2, 4, False), "1x8": (1, 8, False),
          "4x2-fsdp": (4, 2, True), "8x1-fsdp": (8, 1, True)}
# Heads, kv heads, MLP units and vocabulary (260 = 4 x 65) divide some of the model axes and
# not others, so both real splits and the replicate-when-it-does-not-divide rule are exercised.
MODEL = {"model.dim": 64, "model.n_heads": 8, "model.n_kv_heads": 4, "model.mlp_hidden": 128, "model.n_layers": 2,
         "model.scan_layers": True}


def config(root, mesh=None, **extra):
    overrides = {**MODEL, "train.batch_size": 8, "train.steps": 5, "train.log_every": 1, "train.eval_every": 5,
                 "data.cache_dir": str(root / "data"), **extra}
    if mesh is not None:
        data, model, fsdp = MESHES[mesh]
        overrides.update({"parallel.data": data, "parallel.model": model, "parallel.fsdp": fsdp})
    return tiny_facts_config(**overrides)


def losses(workdir):
    lines = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["train/loss"] for line in lines if "train/loss" in line}


def layout_of(cfg):
    p = cfg.parallel
    return Layout.from_devices(p.data, p.model, p.fsdp)


def restored_state(cfg, workdir, layout):
    model = build_model(cfg.model)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    shardings = state_shardings(model, tx, cfg.train.seq_len, layout)
    abstract = abstract_train_state(init_state_fn(model, tx, cfg.train.seq_len), cfg.seed, shardings)
    checkpointer = Checkpointer(Path(workdir) / "checkpoints", keep=5, async_save=False)
    try:
        state, _ = checkpointer.restore(abstract, data=False)
    finally:
        checkpointer.close()
    return state


def shard_shapes(tree):
    """'path' -> [global shape, shape of the first addressable shard] for every leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "addressable_shards"):
            out[jax.tree_util.keystr(path)] = [list(leaf.shape), list(leaf.addressable_shards[0].data.shape)]
    return out


def host(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def init_memory(root, mesh):
    """(bytes of the whole train state, per-device output bytes, per-device temporary bytes) of
    the compiled sharded initialisation."""
    cfg = config(root, mesh, **{"model.dim": 256, "model.mlp_hidden": 1024})
    model = build_model(cfg.model)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    layout = layout_of(cfg)
    init = init_state_fn(model, tx, cfg.train.seq_len)
    jitted = layout.jit(init, out_shardings=state_shardings(model, tx, cfg.train.seq_len, layout)).jitted
    with layout.context():
        memory = jitted.lower(jax.random.PRNGKey(0)).compile().memory_analysis()
    full = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(jax.eval_shape(init, jax.random.PRNGKey(0))))
    return [full, memory.output_size_in_bytes, memory.temp_size_in_bytes]


def generations(root, layouts):
    """Greedy tokens of one random model (no stop tokens: every lane runs its full length)."""
    cfg = config(root, **{"model.init": "fan_in"})
    model = build_model(cfg.model)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(7), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 1, 23, 40, 9, 2, 17, 30)]
    out = {}
    for name, layout in layouts.items():
        placed = jax.device_put(params, param_shardings(model, cfg.train.seq_len, layout))
        decoder = Decoder(model, lanes=8, max_len=96, chunk=8, layout=layout)
        out[name] = decode_all(decoder, placed, prompts, n_new=40)
        out[f"{name}-cache-shard"] = list(decoder.init_state().cache.k.addressable_shards[0].data.shape)
        # a paged cache on the mesh, two lanes sharing the pages of a common 32-token prefix
        paged = Decoder(model, lanes=8, max_len=96, chunk=8, layout=layout, page_size=16)
        out[f"{name}-paged"] = decode_all(paged, placed, prompts[:7] + [prompts[3][:32] + [1, 2]], n_new=40)
        out[f"{name}-paged-shared"] = int(paged.pages.counts["shared"])
    return out


def main(root):
    root = Path(root)
    results = {"devices": jax.device_count()}
    if jax.device_count() == 1:
        results["losses"] = {"1": losses_of_run(root, None)}
        print(json.dumps(results))
        return
    results["losses"] = {mesh: losses_of_run(root, mesh) for mesh in MESHES}
    results["shards"] = {}
    for mesh in MESHES:
        cfg = config(root, mesh)
        state = restored_state(cfg, root / f"run-{mesh}", layout_of(cfg))
        results["shards"][mesh] = shard_shapes({"params": state.params, "opt_state": state.opt_state})

    # A checkpoint written on (4, 2), restored onto (1, 8) and onto one device.
    saved = host(restored_state(config(root, "4x2"), root / "run-4x2", layout_of(config(root, "4x2"))).params)
    for name, layout in (("1x8", layout_of(config(root, "1x8"))), ("one-device", Layout.single_device())):
        params = restored_state(config(root, "4x2"), root / "run-4x2", layout).params
        results.setdefault("restore_equal", {})[name] = all(
            np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(host(params)))
        )
        results.setdefault("restore_devices", {})[name] = len(jax.tree_util.tree_leaves(params)[0].sharding.device_set)

    # Training resumed on another mesh: 3 steps on (4, 2), then steps 4-5 on (1, 8).
    resumed = root / "run-resumed"
    train(config(root, "4x2", **{"train.steps": 3}), resumed)
    train(config(root, "1x8"), resumed)
    results["resumed_losses"] = losses(resumed)

    results["init_memory"] = {mesh: init_memory(root, mesh) for mesh in ("8x1", "8x1-fsdp")}
    single = Layout.single_device()
    results["generations"] = generations(root, {"one-device": single, "4x2": layout_of(config(root, "4x2")),
                                                "1x8": layout_of(config(root, "1x8"))})
    print(json.dumps(results))


def losses_of_run(root, mesh):
    workdir = root / f"run-{mesh or 'one'}"
    train(config(root, mesh), workdir)
    return losses(workdir)


if __name__ == "__main__":
    main(sys.argv[1])
