"""Model families, chosen by `implementation.model`."""
from lmjax.models.attention import ATTENTION_IMPLEMENTATIONS
from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.registry import Registry

MODELS = Registry("implementation.model")
ATTENTIONS = Registry("implementation.attention")
for _name, _fn in ATTENTION_IMPLEMENTATIONS.items():
    ATTENTIONS.register(_name)(_fn)


@MODELS.register("transformer")
def build_transformer(config):
    m = config.model
    return Transformer(
        TransformerConfig(
            vocab_size=m.vocab_size, dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads, mlp_hidden=m.mlp_hidden, tie_embeddings=m.tie_embeddings,
            rope_base=m.rope_base, norm_eps=m.norm_eps, init=m.init, remat=m.remat,
            scan_layers=m.scan_layers, attention=config.implementation.attention,
            param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, prefix_lm=m.get("prefix_lm", False),
        )
    )


def build_model(config):
    return MODELS.get(config.implementation.model)(config)
