import dataclasses
import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import load_config_file, parse_config
from lmjax.models import build_model
from lmjax.models.transformer import Transformer, TransformerConfig

REPO = Path(__file__).resolve().parents[1]
LOGICAL_NAMES = {"layers", "vocab", "embed", "heads", "kv", "mlp"}

# Small enough to compile in about a second; 4 query heads over 2 kv heads exercises GQA.
SMALL = TransformerConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64, prefix_lm=True)
# prefix_lm=True: the prompt argument is honoured (a model without it ignores prompts; tested below).
B, L = 4, 12  # one shape for most tests, so each model variant compiles once

# Compiling `init` (threefry random bits for every tensor) costs seconds on a small CPU, so most
# tests take parameter shapes from `eval_shape` and fill them here; only the init test runs it.


def param_shapes(cfg):
    return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))


def random_params(cfg, seed=0):
    """Weights of unit-scale activations (std 1/sqrt(fan_in), embeddings std 1, norm scales near
    1), so logits are O(1) and differences between code paths are easy to see."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = "/".join(k.key for k in path)
        if name.endswith("scale"):
            value = 1 + 0.1 * rng.normal(size=leaf.shape)
        elif name.endswith("embedding"):
            value = rng.normal(size=leaf.shape)
        else:
            value = rng.normal(size=leaf.shape) / np.sqrt(cfg.mlp_hidden if "w_down" in name else cfg.dim)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(param_shapes(cfg)["params"]))


@functools.cache  # one compiled function per config, shared by the tests
def logits_fn(cfg):
    """Jitted (params, tokens, positions, segment_ids, prompt) -> logits."""
    model = Transformer(cfg)
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args))


def random_tokens(seed, shape, vocab):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), jnp.int32)


def plain_rows(batch=B, length=L):
    """Positions 0.., one segment, no prompt: the defaults, spelled out."""
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return positions, jnp.ones((batch, length), jnp.int32), jnp.zeros((batch, length), bool)


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def flat(tree):
    return {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_logits_shape_and_dtype():
    params = random_params(SMALL)
    tokens = random_tokens(0, (B, L), SMALL.vocab_size)
    logits = jax.jit(lambda p, t: Transformer(SMALL).apply({"params": p}, t))(params, tokens)  # default args
    assert logits.shape == (B, L, SMALL.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    # The defaults are positions 0.., one segment, no prompt.
    np.testing.assert_array_equal(np.asarray(logits_fn(SMALL)(params, tokens, *plain_rows())), np.asarray(logits))


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
    shapes = jax.eval_shape(lambda: build_model(parse_config(config).model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
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
    variables = param_shapes(cfg)
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
    params = random_params(SMALL)
    a = random_tokens(1, (4,), SMALL.vocab_size)
    b = random_tokens(2, (6,), SMALL.vocab_size)
    pad = jnp.zeros((L - 10,), jnp.int32)
    packed_tokens = jnp.concatenate([a, b, pad])
    packed_segments = jnp.asarray([1] * 4 + [2] * 6 + [0] * (L - 10))
    packed_positions = jnp.asarray(list(range(4)) + list(range(6)) + [0] * (L - 10))
    positions, segments, prompt = plain_rows()
    # Row 0: a and b packed. Rows 1, 2: each alone at the start of a plain causal row (what comes
    # after them cannot reach them). Row 3: packed tokens and positions but one segment.
    tokens = jnp.stack([packed_tokens, jnp.concatenate([a, b, pad]), jnp.concatenate([b, a, pad]), packed_tokens])
    positions = positions.at[0].set(packed_positions).at[3].set(packed_positions)
    segments = segments.at[0].set(packed_segments)
    logits = np.asarray(logits_fn(SMALL)(params, tokens, positions, segments, prompt))
    # Masked keys get exactly zero weight; only f32 summation order may differ between rows.
    np.testing.assert_allclose(logits[0, :4], logits[1, :4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, 4:10], logits[2, :6], rtol=1e-5, atol=1e-5)
    assert np.isfinite(logits[0, 10:]).all()  # padding rows stay defined
    # Not vacuous: without segment ids the second segment sees the first.
    assert np.abs(logits[3, 4:10] - logits[2, :6]).max() > 1e-2


def test_scanned_and_unrolled_layers_agree_on_restacked_weights():
    cfg_loop = dataclasses.replace(SMALL, scan_layers=False)
    params = random_params(SMALL)
    unrolled = {k: v for k, v in params.items() if k != "layers"}
    for i in range(SMALL.n_layers):
        unrolled[f"layer_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    assert jax.tree.structure(unrolled) == jax.tree.structure(nn.meta.unbox(param_shapes(cfg_loop)["params"]))
    tokens = random_tokens(3, (B, L), SMALL.vocab_size)
    # Same math, only scan vs straight-line code: XLA may fuse differently, rounding ~1e-6 on
    # O(1) logits.
    np.testing.assert_allclose(
        np.asarray(logits_fn(SMALL)(params, tokens, *plain_rows())),
        np.asarray(logits_fn(cfg_loop)(unrolled, tokens, *plain_rows())),
        rtol=1e-5, atol=1e-5,
    )


def test_remat_full_gives_same_logits_and_grads():
    # One scanned layer: remat wraps each block the same way at any depth, and a gradient
    # program of one layer compiles in half the time of two.
    cfg = dataclasses.replace(SMALL, n_layers=1)
    params = random_params(cfg)
    tokens = random_tokens(4, (B, L), cfg.vocab_size)

    def loss_and_grad(cfg):
        model = Transformer(cfg)

        def loss(p):
            logits = model.apply({"params": p}, tokens)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    def traced(cfg):
        return str(jax.make_jaxpr(lambda p: Transformer(cfg).apply({"params": p}, tokens))(params))

    # Not vacuous: 'full' really wraps the blocks in a rematerialised (checkpointed) call.
    assert "remat" in traced(dataclasses.replace(cfg, remat="full")) and "remat" not in traced(cfg)

    (loss_a, logits_a), grads_a = loss_and_grad(cfg)
    (loss_b, logits_b), grads_b = loss_and_grad(dataclasses.replace(cfg, remat="full"))
    # Rematerialisation recomputes the same ops; only fusion choices may differ (f32 rounding).
    np.testing.assert_allclose(np.asarray(logits_b), np.asarray(logits_a), rtol=1e-5, atol=1e-5)
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-6)
    flat_b = flat(grads_b)
    for name, g in flat(grads_a).items():
        scale = float(np.abs(np.asarray(g)).max())
        np.testing.assert_allclose(np.asarray(flat_b[name]), np.asarray(g), rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_bfloat16_compute_is_close_to_float32():
    cfg16 = dataclasses.replace(SMALL, compute_dtype="bfloat16")
    params = random_params(SMALL)  # f32 weights, cast to bf16 where they meet activations
    tokens = random_tokens(5, (B, L), SMALL.vocab_size)
    l32 = np.asarray(logits_fn(SMALL)(params, tokens, *plain_rows()))
    l16 = logits_fn(cfg16)(params, tokens, *plain_rows())
    assert l16.dtype == jnp.float32  # logits come back in f32 whatever the compute dtype
    l16 = np.asarray(l16)
    assert np.isfinite(l16).all()
    # bf16 rounds every matmul input to 8 mantissa bits (2^-8 ~ 0.4%); through two blocks and
    # O(1) activations the error compounds to a few percent of the logit scale, far below the
    # O(1) error of a broken cast.
    assert np.abs(l16 - l32).max() < 0.1 * np.abs(l32).max()
    assert np.corrcoef(l16.ravel(), l32.ravel())[0, 1] > 0.99


def test_tied_embeddings_drop_lm_head_and_read_the_embedding():
    tied = dataclasses.replace(SMALL, tie_embeddings=True)
    params = random_params(tied)
    assert "lm_head" not in params and "lm_head" in param_shapes(SMALL)["params"]
    assert n_params(param_shapes(SMALL)["params"]) - n_params(params) == SMALL.vocab_size * SMALL.dim
    # Tokens avoid id 7, so changing embedding row 7 can only act through the output head, and
    # there only on logit column 7.
    tokens = random_tokens(6, (B, L), SMALL.vocab_size - 8) + 8
    apply = logits_fn(tied)
    before = np.asarray(apply(params, tokens, *plain_rows()))
    params2 = jax.tree.map(lambda x: x, params)
    params2["embed"]["embedding"] = params["embed"]["embedding"].at[7].multiply(-2.0)
    after = np.asarray(apply(params2, tokens, *plain_rows()))
    assert before.shape == (B, L, SMALL.vocab_size)
    np.testing.assert_array_equal(np.delete(after, 7, axis=-1), np.delete(before, 7, axis=-1))
    # The head is x @ E^T: scaling row 7 by -2 scales logit 7 by -2 (f32 rounding only).
    np.testing.assert_allclose(after[..., 7], -2.0 * before[..., 7], rtol=1e-5, atol=1e-5)


def expected_stds(scheme, E, F, n_layers):
    """The two schemes by hand: outputs into the residual stream are scaled by 1/sqrt(2 n_layers)."""
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
    # An 'rbg' key compiles in a fraction of threefry's time; the scheme sets the std, not the
    # bit generator.
    variables = jax.jit(Transformer(cfg).init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 8), jnp.int32))
    params = nn.meta.unbox(variables["params"])
    got = {
        "embed": params["embed"]["embedding"],
        **{n: params["layers"]["attention"][n]["kernel"] for n in ("wq", "wk", "wv", "wo")},
        **{n: params["layers"]["mlp"][n]["kernel"] for n in ("w_gate", "w_up", "w_down")},
        "lm_head": params["lm_head"]["kernel"],
    }
    for name, std in expected_stds(scheme, 64, 256, 2).items():
        x = np.asarray(got[name])
        # >= 8,192 samples each: the sample std is within 1/sqrt(2N) < 1% of the truth (1 sigma);
        # 5% is > 6 sigma, while the two schemes differ by 2.8x or more on every tensor.
        assert x.std() == pytest.approx(std, rel=0.05), name
        assert abs(x.mean()) < 5 * std / np.sqrt(x.size), name
    for norm in (params["final_norm"], params["layers"]["attention_norm"], params["layers"]["mlp_norm"]):
        np.testing.assert_array_equal(np.asarray(norm["scale"]), 1.0)


def test_prefix_lm_one_layer_changes_only_prompt_positions_before_the_last():
    # With one layer every query reads the embeddings directly. The last prompt token and all
    # tokens after the prompt see exactly the same keys (everything up to themselves) with or
    # without prefix-LM, so their logits must not move; earlier prompt tokens now also see
    # later prompt tokens, so theirs must.
    cfg = dataclasses.replace(SMALL, n_layers=1)
    params = random_params(cfg)
    P = 5
    tokens = random_tokens(7, (B, L), cfg.vocab_size)
    positions, segments, no_prompt = plain_rows()
    prompt = jnp.broadcast_to(jnp.arange(L) < P, (B, L))
    apply = logits_fn(cfg)
    causal = np.asarray(apply(params, tokens, positions, segments, no_prompt))
    prefix = np.asarray(apply(params, tokens, positions, segments, prompt))
    np.testing.assert_allclose(prefix[:, P - 1 :], causal[:, P - 1 :], rtol=1e-5, atol=1e-5)
    assert (np.abs(prefix[:, : P - 1] - causal[:, : P - 1]).max(axis=-1) > 1e-3).all()


def test_prefix_lm_is_bidirectional_in_the_prompt_and_causal_after_it():
    params = random_params(SMALL)
    P = 4
    edits = [P - 1, P, L - 2]  # last prompt token, first token after the prompt, a late token
    base = random_tokens(8, (L,), SMALL.vocab_size)
    # Row 0 is the original; row i+1 changes one token at edits[i].
    tokens = jnp.stack([base] + [base.at[t].set((base[t] + 1) % SMALL.vocab_size) for t in edits])
    positions, segments, no_prompt = plain_rows()
    prompt = jnp.broadcast_to(jnp.arange(L) < P, (B, L))
    apply = logits_fn(SMALL)

    def changed_positions(flags):
        logits = np.asarray(apply(params, tokens, positions, segments, flags))
        moved = np.abs(logits[1:] - logits[:1]).max(-1) > 1e-5  # [edit, position]
        return [set(np.nonzero(row)[0].tolist()) for row in moved]

    with_prompt, without_prompt = changed_positions(prompt), changed_positions(no_prompt)
    # Changing the last prompt token reaches every position, the first prompt token included,
    # only under prefix-LM.
    assert with_prompt[0] == set(range(L))
    assert without_prompt[0] == set(range(P - 1, L))
    # After the prompt nothing leaks backwards: a token at t changes logits at t and later only.
    for i, t in enumerate(edits[1:], start=1):
        assert with_prompt[i] == set(range(t, L))
        assert without_prompt[i] == set(range(t, L))


def test_prompt_is_ignored_unless_the_model_is_prefix_lm():
    cfg = dataclasses.replace(SMALL, prefix_lm=False)
    params = random_params(cfg)
    tokens = random_tokens(9, (B, L), cfg.vocab_size)
    positions, segments, no_prompt = plain_rows()
    prompt = jnp.broadcast_to(jnp.arange(L) < 5, (B, L))
    apply = logits_fn(cfg)
    np.testing.assert_array_equal(
        np.asarray(apply(params, tokens, positions, segments, prompt)),
        np.asarray(apply(params, tokens, positions, segments, no_prompt)),
    )


@pytest.mark.parametrize("scan_layers", [pytest.param(False, marks=pytest.mark.slow), pytest.param(True, marks=pytest.mark.slow)])  # 24-27 s each: slow run
def test_block_skipping_gives_the_full_models_logits_and_grads(scan_layers):
    """attention_block=8 with the longest-sequence promise against the plain model, on rows of
    40 packed with sequences of at most 11 tokens (prompts attending both ways)."""
    rng = np.random.default_rng(0)
    length, longest = 40, 11
    segments = np.zeros((B, length), np.int32)
    positions = np.zeros((B, length), np.int32)
    for b in range(B):
        start, segment = 0, 1
        while start < length - 5:
            n = min(int(rng.integers(3, longest + 1)), length - start)
            segments[b, start:start + n], positions[b, start:start + n] = segment, np.arange(n)
            start, segment = start + n, segment + 1
    tokens = random_tokens(3, (B, length), SMALL.vocab_size)
    prompt = jnp.asarray((positions < 3) & (segments > 0))
    args = (tokens, jnp.asarray(positions), jnp.asarray(segments), prompt)
    targets = random_tokens(4, (B, length), SMALL.vocab_size)
    plain = dataclasses.replace(SMALL, scan_layers=scan_layers)
    blocked = dataclasses.replace(plain, attention_block=8)
    params = random_params(plain)

    def loss_and_grads(cfg, promise):
        def loss(p):
            logits = Transformer(cfg).apply({"params": p}, *args, max_segment_len=promise)
            log_probs = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1)), logits
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, grads

    want_logits, want_grads = loss_and_grads(plain, 0)
    for promise in (0, longest):
        logits, grads = loss_and_grads(blocked, promise)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
        for name, g in flat(grads).items():
            np.testing.assert_allclose(np.asarray(g), np.asarray(flat(want_grads)[name]), rtol=1e-4, atol=1e-6, err_msg=name)
    # Not vacuous: a broken promise (sequences longer than 5) drops keys the mask allows.
    broken, _ = loss_and_grads(blocked, 5)
    assert np.abs(np.asarray(broken) - np.asarray(want_logits)).max() > 1e-2
