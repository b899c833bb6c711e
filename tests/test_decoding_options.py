"""Decoding programs take YNNPACK's dot fusions back on CPU when lmjax's entry points turned them
off for training (lmjax.xla_flags.decoding_compiler_options)."""
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.generate.decoder import Decoder, LaneRequests
from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.xla_flags import CPU_FLAGS, YNN_DEFAULT, YNN_FUSION, decoding_compiler_options


def test_options_only_undo_lmjax_own_flag(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 {CPU_FLAGS[0]}")
    assert decoding_compiler_options() == {YNN_FUSION: YNN_DEFAULT}
    monkeypatch.setenv("XLA_FLAGS", f"--{YNN_FUSION}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")  # the user's own choice stays
    assert decoding_compiler_options() == {}
    monkeypatch.delenv("XLA_FLAGS")
    assert decoding_compiler_options() == {}


def test_decoder_compiled_with_the_options_gives_the_same_tokens(monkeypatch):
    cfg = TransformerConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64, tie_embeddings=True)
    model = Transformer(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    prompts = [[1, 5, 9, 13], [2, 4], [7, 7, 7, 3, 11]]
    requests = LaneRequests.empty(3).replace(max_new=np.full(3, 12, np.int32))

    def greedy():
        decoder = Decoder(model, 3, 32, chunk=4)
        state = decoder.init_state()
        state, first = decoder.prefill(params, state, prompts, np.zeros(3, np.int32), requests, prompt=[True] * 3,
                                       reset=[True] * 3)
        out = [[int(t)] for t in first]
        while np.asarray(state.active).any():
            state, tokens, counts = decoder.decode(params, state, requests)
            for b in range(3):
                out[b] += tokens[b, : counts[b]].tolist()
        return out

    monkeypatch.setenv("XLA_FLAGS", CPU_FLAGS[0])  # as after tune_xla_cpu_flags: the options are passed to XLA
    with_options = greedy()
    monkeypatch.delenv("XLA_FLAGS")
    assert with_options == greedy() and all(len(t) == 12 for t in with_options)
