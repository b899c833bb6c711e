"""DP, TP and FSDP layouts on 8 simulated CPU devices against one device.

The cases run in subprocesses (tests/parallel_worker.py) because the simulated device count
must be fixed before jax starts, and the rest of the suite runs on one device.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # 8 simulated devices, ~2.5 min: run with -m slow (CI does)

WORKER = Path(__file__).resolve().parent / "parallel_worker.py"
MESHES = ("8x1", "4x2", "2x4", "1x8", "4x2-fsdp", "8x1-fsdp")


def run_worker(root, devices, env):
    env = dict(env)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    done = subprocess.run([sys.executable, str(WORKER), str(root)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(WORKER.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    one = run_worker(tmp_path_factory.mktemp("one"), 1, env)
    eight = run_worker(tmp_path_factory.mktemp("eight"), 8, env)
    assert (one["devices"], eight["devices"]) == (1, 8)
    return one, eight


@pytest.mark.parametrize("mesh", MESHES)
def test_five_steps_on_a_mesh_give_the_losses_of_one_device(results, mesh):
    one, eight = results
    reference, got = one["losses"]["1"], eight["losses"][mesh]
    assert list(got) == ["1", "2", "3", "4", "5"]
    # f32; the layouts differ only in the order of the reductions (gradient all-reduce over
    # data, partial sums over model), which moves the loss by ~1e-6.
    np.testing.assert_allclose([got[s] for s in got], [reference[s] for s in got], rtol=0, atol=1e-5)


# (global shape, local shard shape) of a few parameters: dim 64, 8 heads of 8, 4 kv heads,
# 128 MLP units, vocabulary 260 = 4 x 65, two scanned layers. A mesh axis that does not divide
# a dimension leaves it whole (kv heads on 8 model devices, vocabulary on 8).
EXPECTED = {
    "4x2": {"['params']['layers']['attention']['wq']['kernel']": [[2, 64, 8, 8], [2, 64, 4, 8]],
            "['params']['layers']['mlp']['w_down']['kernel']": [[2, 128, 64], [2, 64, 64]],
            "['params']['embed']['embedding']": [[260, 64], [130, 64]]},
    "2x4": {"['params']['layers']['attention']['wk']['kernel']": [[2, 64, 4, 8], [2, 64, 1, 8]],
            "['params']['embed']['embedding']": [[260, 64], [65, 64]]},
    "1x8": {"['params']['layers']['attention']['wq']['kernel']": [[2, 64, 8, 8], [2, 64, 1, 8]],
            "['params']['layers']['attention']['wk']['kernel']": [[2, 64, 4, 8], [2, 64, 4, 8]],
            "['params']['layers']['mlp']['w_up']['kernel']": [[2, 64, 128], [2, 64, 16]],
            "['params']['embed']['embedding']": [[260, 64], [260, 64]]},
    "8x1": {"['params']['layers']['attention']['wq']['kernel']": [[2, 64, 8, 8], [2, 64, 8, 8]]},
    "4x2-fsdp": {"['params']['layers']['attention']['wq']['kernel']": [[2, 64, 8, 8], [2, 16, 4, 8]],
                 "['params']['layers']['mlp']['w_down']['kernel']": [[2, 128, 64], [2, 64, 16]],
                 "['params']['embed']['embedding']": [[260, 64], [130, 16]],
                 "['params']['layers']['attention_norm']['scale']": [[2, 64], [2, 16]]},
    "8x1-fsdp": {"['params']['embed']['embedding']": [[260, 64], [260, 8]],
                 "['params']['lm_head']['kernel']": [[64, 260], [8, 260]]},
}


@pytest.mark.parametrize("mesh", MESHES)
def test_parameter_and_optimizer_shards_have_the_expected_shapes(results, mesh):
    shards = results[1]["shards"][mesh]
    for name, shapes in EXPECTED[mesh].items():
        assert shards[name] == shapes, name
    # Adam's moments are laid out like their parameters.
    for name, shapes in shards.items():
        if name.startswith("['params']"):
            leaf = name[len("['params']"):]
            for moment in ("mu", "nu"):
                assert shards[f"['opt_state'][0][0].{moment}{leaf}"] == shapes, (moment, leaf)


def test_sharded_initialisation_never_builds_the_full_state_on_one_device(results):
    (full, out_dp, _), (_, out_fsdp, temp_fsdp) = (results[1]["init_memory"][m] for m in ("8x1", "8x1-fsdp"))
    assert out_dp >= full  # data parallel: every device holds the whole state
    # FSDP over 8 devices: each creates its eighth (plus replicated counters and PRNG key), and
    # its scratch space stays well below the full state (random bits generated per shard).
    assert out_fsdp <= full / 8 + 1024
    assert temp_fsdp < full / 8


def test_checkpoint_from_a_4x2_mesh_restores_onto_1x8_and_one_device_unchanged(results):
    eight = results[1]
    assert eight["restore_equal"] == {"1x8": True, "one-device": True}
    assert eight["restore_devices"] == {"1x8": 8, "one-device": 1}


def test_training_resumed_on_another_mesh_continues_the_same_run(results):
    one, eight = results
    resumed, reference = eight["resumed_losses"], one["losses"]["1"]
    assert list(resumed) == ["1", "2", "3", "4", "5"]  # steps 1-3 on (4, 2), then 4-5 on (1, 8)
    np.testing.assert_allclose([resumed[s] for s in resumed], [reference[s] for s in resumed], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mesh", ["4x2", "1x8"])
def test_greedy_generation_on_a_mesh_equals_one_device_token_for_token(results, mesh):
    generations = results[1]["generations"]
    assert [len(t) for t in generations["one-device"]] == [40] * 8
    assert generations[mesh] == generations["one-device"]
    # The cache is split by lanes over `data` and by kv heads over `model` (4 kv heads do not
    # divide 8 model devices, so there they stay whole): [layers, lanes, slots, kv heads, dim].
    expected_shard = {"4x2": [2, 2, 96, 2, 8], "1x8": [2, 8, 96, 4, 8]}[mesh]
    assert generations[f"{mesh}-cache-shard"] == expected_shard
    # the paged cache on the same mesh: the same tokens, and the last lane shares two pages
    assert generations[f"{mesh}-paged"][:7] == generations["one-device"][:7]
    assert generations[f"{mesh}-paged"] == generations["one-device-paged"]
    assert generations[f"{mesh}-paged-shared"] == 2
