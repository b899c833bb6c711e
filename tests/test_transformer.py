import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import load_config_file
from lmjax.models import build_model
from lmjax.models.transformer import Transformer, TransformerConfig

REPO = Path(__file__).resolve().parents[1]
LOGICAL_NAMES = {"layers", "vocab", "embed", "heads", "kv", "mlp"}

# Small enough to compile in about a second; 4 query heads over 2 kv heads exercises GQA.
SMALL = TransformerConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64)


def init_params(cfg, seed=0, length=8):
    variables = Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, length), jnp.int32))
    return variables, nn.meta.unbox(variables["params"])


def logits_fn(cfg):
    model = Transformer(cfg)
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args))


def random_tokens(seed, shape, vocab):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), jnp.int32)


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def flat(tree):
    return {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_logits_shape_and_dtype():
    _, params = init_params(SMALL)
    logits = logits_fn(SMALL)(params, random_tokens(0, (3, 11), SMALL.vocab_size))
    assert logits.shape == (3, 11, SMALL.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def facts_model_param_count(V, E, n_layers, H, K, F, tied):
    """Llama block by hand: q/o are E x (H*D), k/v are E x (K*D), three E x F MLP matrices, two
    norm scales per block, one final norm, embedding, and an output head unless tied."""
    D = E // H
    per_layer = 2 * E * H * D + 2 * E * K * D + 3 * E * F + 2 * E
    return V * E + n_layers * per_layer + E + (0 if tied else E * V)


def test_default_facts_model_has_164672_params():
    config = load_config_file(REPO / "configs" / "facts.py")
    m = config.model
    assert (m.vocab_size, m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_hidden, m.tie_embeddings) == (
        260, 64, 2, 2, 2, 256, False,
    )
    expected = facts_model_param_count(260, 64, 2, 2, 2, 256, tied=False)
    assert expected == 164_672
    shapes = jax.eval_shape(lambda: build_model(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    assert n_params(nn.meta.unbox(shapes["params"])) == expected


EXPECTED_SPECS = {
    "embed/embedding": ("vocab", "embed"),
    "attention/wq/kernel": ("embed", "heads", "kv"),
    "attention/wk/kernel": ("embed", "heads", "kv"),
    "attention/wv/kernel": ("embed", "heads", "kv"),
    "attention/wo/kernel": ("heads", "kv", "embed"),
    "attention_norm/scale": ("embed",),
    "mlp/w_gate/kernel": ("embed", "mlp"),
    "mlp/w_up/kernel": ("embed", "mlp"),
    "mlp/w_down/kernel": ("mlp", "embed"),
    "mlp_norm/scale": ("embed",),
    "final_norm/scale": ("embed",),
    "lm_head/kernel": ("embed", "vocab"),
}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_param_has_a_logical_partition_spec(scan_layers):
    cfg = dataclasses.replace(SMALL, scan_layers=scan_layers)
    variables = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    specs = flat(nn.get_partition_spec(variables)["params"])
    shapes = flat(nn.meta.unbox(variables["params"]))
    assert specs.keys() == shapes.keys()
    seen = set()
    for name, spec in specs.items():
        assert isinstance(spec, jax.sharding.PartitionSpec), name
        assert len(spec) == len(shapes[name].shape), name
        assert set(spec) <= LOGICAL_NAMES, (name, spec)
        parts = name.split("/")
        in_layer = parts[0] == "layers" or parts[0].startswith("layer_")
        key = "/".join(parts[1:]) if in_layer else name
        want = EXPECTED_SPECS[key]
        if in_layer and scan_layers:
            want = ("layers",) + want
        assert tuple(spec) == want, name
        seen.add(key)
    assert seen == EXPECTED_SPECS.keys()


def test_packed_segments_equal_each_segment_alone():
    _, params = init_params(SMALL)
    apply = logits_fn(SMALL)
    a = random_tokens(1, (1, 5), SMALL.vocab_size)
    b = random_tokens(2, (1, 7), SMALL.vocab_size)
    pad = 2
    tokens = jnp.concatenate([a, b, jnp.zeros((1, pad), jnp.int32)], axis=1)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 7 + [0] * pad])
    positions = jnp.asarray([list(range(5)) + list(range(7)) + [0] * pad])
    packed = np.asarray(apply(params, tokens, positions, segment_ids))
    alone_a = np.asarray(apply(params, a))
    alone_b = np.asarray(apply(params, b))
    # Masked keys get exactly zero weight, so only f32 summation order differs with the shapes.
    np.testing.assert_allclose(packed[:, :5], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, 5:12], alone_b, rtol=1e-5, atol=1e-5)
    assert np.isfinite(packed[:, 12:]).all()  # padding rows stay defined
    # Not vacuous: without segment ids the second segment would see the first.
    unpacked = np.asarray(apply(params, tokens, positions))
    assert np.abs(unpacked[:, 5:12] - alone_b).max() > 1e-3


def test_scanned_and_unrolled_layers_agree_on_restacked_weights():
    cfg_scan = SMALL
    cfg_loop = dataclasses.replace(SMALL, scan_layers=False)
    _, params = init_params(cfg_scan)
    unrolled = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg_scan.n_layers):
        unrolled[f"layer_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    _, reference = init_params(cfg_loop)
    assert jax.tree.structure(unrolled) == jax.tree.structure(reference)
    tokens = random_tokens(3, (2, 9), SMALL.vocab_size)
    # Same math, only scan vs straight-line code: XLA may fuse differently, rounding ~1e-7.
    np.testing.assert_allclose(
        np.asarray(logits_fn(cfg_scan)(params, tokens)),
        np.asarray(logits_fn(cfg_loop)(unrolled, tokens)),
        rtol=1e-5, atol=1e-6,
    )


def test_remat_full_gives_same_logits_and_grads():
    cfg_remat = dataclasses.replace(SMALL, remat="full")
    _, params = init_params(SMALL)
    tokens = random_tokens(4, (2, 9), SMALL.vocab_size)

    def loss_and_grad(cfg):
        model = Transformer(cfg)

        def loss(p):
            logits = model.apply({"params": p}, tokens)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (loss_a, logits_a), grads_a = loss_and_grad(SMALL)
    (loss_b, logits_b), grads_b = loss_and_grad(cfg_remat)
    # Rematerialisation recomputes the same ops; only fusion choices may differ (~1e-7).
    np.testing.assert_allclose(np.asarray(logits_b), np.asarray(logits_a), rtol=1e-5, atol=1e-6)
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-6)
    for name, g in flat(grads_a).items():
        np.testing.assert_allclose(np.asarray(flat(grads_b)[name]), np.asarray(g), rtol=1e-4, atol=1e-7, err_msg=name)


def test_bfloat16_compute_is_close_to_float32():
    # fan_in init gives O(1) logits, so a relative bound is meaningful.
    cfg32 = dataclasses.replace(SMALL, init="fan_in")
    cfg16 = dataclasses.replace(cfg32, compute_dtype="bfloat16")
    _, params = init_params(cfg32)
    tokens = random_tokens(5, (2, 9), SMALL.vocab_size)
    l32 = np.asarray(logits_fn(cfg32)(params, tokens))
    l16 = logits_fn(cfg16)(params, tokens)
    assert l16.dtype == jnp.float32  # logits are returned in f32 whatever the compute dtype
    l16 = np.asarray(l16)
    assert np.isfinite(l16).all()
    # bf16 rounds every matmul input to 8 mantissa bits (2^-8 ~ 0.4%); through two blocks the
    # error compounds to a few percent of the logit scale, far below a broken model's O(1).
    assert np.abs(l16 - l32).max() < 0.1 * np.abs(l32).max()
    assert np.corrcoef(l16.ravel(), l32.ravel())[0, 1] > 0.99


def test_tied_embeddings_drop_lm_head():
    tied = dataclasses.replace(SMALL, tie_embeddings=True)
    _, params_tied = init_params(tied)
    _, params_untied = init_params(SMALL)
    assert "lm_head" not in params_tied and "lm_head" in params_untied
    assert n_params(params_untied) - n_params(params_tied) == SMALL.vocab_size * SMALL.dim
    tokens = random_tokens(6, (2, 9), SMALL.vocab_size)
    assert logits_fn(tied)(params_tied, tokens).shape == (2, 9, SMALL.vocab_size)
    # The head really is the embedding: scaling the table's rows scales the logits' columns' spread.
    grads = jax.grad(lambda p: logits_fn(tied)(p, tokens)[0, -1, 7])(params_tied)
    assert np.abs(np.asarray(grads["embed"]["embedding"][7])).max() > 0


def expected_stds(scheme, E, F, n_layers):
    out_scale = (2 * n_layers) ** -0.5
    if scheme == "normal":
        s = 0.02
        return {"embed": s, "wq": s, "wk": s, "wv": s, "wo": s * out_scale, "w_gate": s, "w_up": s,
                "w_down": s * out_scale, "lm_head": s}
    return {"embed": 1.0, "wq": E**-0.5, "wk": E**-0.5, "wv": E**-0.5, "wo": E**-0.5 * out_scale,
            "w_gate": E**-0.5, "w_up": E**-0.5, "w_down": F**-0.5 * out_scale, "lm_head": E**-0.5}


@pytest.mark.parametrize("scheme", ["normal", "fan_in"])
def test_init_scheme_stds_follow_their_formulas(scheme):
    cfg = TransformerConfig(vocab_size=260, dim=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=256, init=scheme)
    _, params = init_params(cfg)
    got = {
        "embed": params["embed"]["embedding"],
        **{n: params["layers"]["attention"][n]["kernel"] for n in ("wq", "wk", "wv", "wo")},
        **{n: params["layers"]["mlp"][n]["kernel"] for n in ("w_gate", "w_up", "w_down")},
        "lm_head": params["lm_head"]["kernel"],
    }
    for name, std in expected_stds(scheme, 64, 256, 2).items():
        x = np.asarray(got[name])
        # >= 8,192 samples each: the sample std is within ~1/sqrt(2N) < 1% of the truth (1 sigma);
        # 5% is > 6 sigma, while the two schemes differ by 2x or more on every tensor.
        assert x.std() == pytest.approx(std, rel=0.05), name
        assert abs(x.mean()) < 5 * std / np.sqrt(x.size), name
    np.testing.assert_array_equal(np.asarray(params["final_norm"]["scale"]), 1.0)


def test_prefix_lm_one_layer_changes_only_prompt_positions_before_the_last():
    # With one layer every query reads the embeddings directly. The last prompt token and all
    # tokens after the prompt see exactly the same keys (everything up to themselves) with or
    # without prefix-LM, so their logits must not move; earlier prompt tokens now also see
    # later prompt tokens, so theirs must.
    cfg = dataclasses.replace(SMALL, n_layers=1)
    _, params = init_params(cfg)
    apply = logits_fn(cfg)
    P, L = 5, 10
    tokens = random_tokens(7, (2, L), cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(L), (2, L))
    segments = jnp.ones((2, L), jnp.int32)
    prompt = jnp.broadcast_to(jnp.arange(L) < P, (2, L))
    causal = np.asarray(apply(params, tokens, positions, segments))
    prefix = np.asarray(apply(params, tokens, positions, segments, prompt))
    np.testing.assert_allclose(prefix[:, P - 1 :], causal[:, P - 1 :], rtol=1e-5, atol=1e-6)
    assert (np.abs(prefix[:, : P - 1] - causal[:, : P - 1]).max(axis=-1) > 1e-4).all()


def test_prefix_lm_is_bidirectional_in_the_prompt_and_causal_after_it():
    _, params = init_params(SMALL)
    apply = logits_fn(SMALL)
    P, L = 4, 10
    tokens = random_tokens(8, (1, L), SMALL.vocab_size)
    positions = jnp.arange(L)[None]
    segments = jnp.ones((1, L), jnp.int32)
    prompt = (jnp.arange(L) < P)[None]

    def changed_positions(where, use_prompt):
        other = tokens.at[0, where].set((tokens[0, where] + 1) % SMALL.vocab_size)
        extra = (prompt,) if use_prompt else ()
        a = np.asarray(apply(params, tokens, positions, segments, *extra))
        b = np.asarray(apply(params, other, positions, segments, *extra))
        return set(np.nonzero(np.abs(a - b).max(-1)[0] > 1e-6)[0].tolist())

    # Changing the last prompt token reaches the first prompt token only under prefix-LM.
    assert changed_positions(P - 1, use_prompt=True) == set(range(L))
    assert changed_positions(P - 1, use_prompt=False) == set(range(P - 1, L))
    # After the prompt nothing leaks backwards: a token at t changes logits at t and later only.
    for t in (P, L - 2):
        assert changed_positions(t, use_prompt=True) == set(range(t, L))
