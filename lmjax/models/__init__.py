"""Model families, chosen by `implementation.model`."""
from lmjax.models.attention import ATTENTION_IMPLEMENTATIONS
from lmjax.models.mamba import Mamba, MambaConfig
from lmjax.models.rnn import RNN, RNNConfig
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
            attention_block=m.get("attention_block", 0),
        )
    )


def _fields_from(model_section, config_cls, **fixed):
    """The config dataclass from `config.model`: its keys that the dataclass has (others, such
    as a transformer's n_heads, are ignored), defaults for the rest."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)} - set(fixed)
    return config_cls(**{k: model_section[k] for k in names if k in model_section}, **fixed)


def _check(check, cfg):
    from lmjax.registry import ConfigError

    try:
        check(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


@MODELS.register("mamba")
def build_mamba(config):
    """Mamba from `config.model`: dim, n_layers, vocab_size and the optional keys of
    MambaConfig (d_state, d_conv, expand, dt_rank, scan, chunk_size, ...)."""
    from lmjax.models.mamba import check_config

    return Mamba(_check(check_config, _fields_from(config.model, MambaConfig)))


@MODELS.register("rnn")
def build_rnn(config):
    """Hawk / minGRU / minLSTM from `config.model` (`model.cell`, default hawk; `rnn.cell`
    overrides it when the config has an `rnn` section) and the optional keys of RNNConfig."""
    from lmjax.models.rnn import check_config

    cfg = _fields_from(config.model, RNNConfig)
    if "rnn" in config and "cell" in config.rnn:
        import dataclasses

        cfg = dataclasses.replace(cfg, cell=config.rnn.cell)
    return RNN(_check(check_config, cfg))


def build_model(config):
    return MODELS.get(config.implementation.model)(config)
