"""lmjax's Transformer against Hugging Face's LlamaForCausalLM with the same weights.

torch and transformers are part of the `test` extra: imported normally, so a missing install
fails loudly instead of skipping.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import unit_scale_weights
from transformers import LlamaConfig, LlamaForCausalLM

from lmjax.models.transformer import Transformer, TransformerConfig

V, E, N_LAYERS, H, K, F = 300, 64, 3, 4, 2, 128
D = E // H
BATCH, LENGTH = 2, 16


def hf_llama(tied, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V, hidden_size=E, intermediate_size=F, num_hidden_layers=N_LAYERS,
        num_attention_heads=H, num_key_value_heads=K, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tied, attn_implementation="eager", max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    unit_scale_weights(model)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def hf_to_lmjax(model, tied):
    """HF Linear weights are [out, in]; lmjax kernels are [in..., out...] with heads split out.
    HF's rotate-half RoPE is lmjax's layout, so q/k need no permutation."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    def layer(i):
        p = f"model.layers.{i}."
        return {
            "attention": {
                "wq": {"kernel": sd[p + "self_attn.q_proj.weight"].T.reshape(E, H, D)},
                "wk": {"kernel": sd[p + "self_attn.k_proj.weight"].T.reshape(E, K, D)},
                "wv": {"kernel": sd[p + "self_attn.v_proj.weight"].T.reshape(E, K, D)},
                "wo": {"kernel": sd[p + "self_attn.o_proj.weight"].T.reshape(H, D, E)},
            },
            "attention_norm": {"scale": sd[p + "input_layernorm.weight"]},
            "mlp": {
                "w_gate": {"kernel": sd[p + "mlp.gate_proj.weight"].T},
                "w_up": {"kernel": sd[p + "mlp.up_proj.weight"].T},
                "w_down": {"kernel": sd[p + "mlp.down_proj.weight"].T},
            },
            "mlp_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
        }

    layers = [layer(i) for i in range(N_LAYERS)]
    params = {
        "embed": {"embedding": sd["model.embed_tokens.weight"]},
        "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers),  # scan's leading layer axis
        "final_norm": {"scale": sd["model.norm.weight"]},
    }
    if not tied:
        params["lm_head"] = {"kernel": model.lm_head.weight.detach().numpy().T}
    return jax.tree.map(jnp.asarray, params)


def lmjax_config(tied):
    return TransformerConfig(
        vocab_size=V, dim=E, n_layers=N_LAYERS, n_heads=H, n_kv_heads=K, mlp_hidden=F,
        tie_embeddings=tied, rope_base=10000.0, norm_eps=1e-5,
    )


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_hf_llama(tied):
    hf = hf_llama(tied)
    params = hf_to_lmjax(hf, tied)
    cfg = lmjax_config(tied)
    # The converter fills exactly the tree lmjax would create, shape for shape.
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    want_shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(shapes["params"]))
    assert jax.tree.map(lambda x: x.shape, params) == want_shapes

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, size=(BATCH, LENGTH))
    # Row 0 starts at position 0; row 1 at 37, as a continuation would, so RoPE is compared
    # away from the origin too.
    positions = np.stack([np.arange(LENGTH), 37 + np.arange(LENGTH)])
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(tokens), position_ids=torch.tensor(positions)).logits.numpy()
    apply = jax.jit(lambda p, t, pos: Transformer(cfg).apply({"params": p}, t, pos))
    got = np.asarray(apply(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32)))
    assert got.shape == want.shape == (BATCH, LENGTH, V)
    assert np.abs(want).max() > 1.0  # logits are O(1), so the bound below is meaningful
    # Both in f32 with the same math in a different op order (fused einsums vs torch matmuls,
    # softmax placement): differences stay ~1e-6 per op, ~1e-5 after three blocks; 1e-4 leaves
    # margin, while a misplaced head, transpose or RoPE pairing is an O(1) error.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
