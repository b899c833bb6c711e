"""Model families, chosen by `implementation.model`; each family's config dataclass is its
`model` section (defaults included)."""
import dataclasses

from lmjax.models.attention import ATTENTION_IMPLEMENTATIONS
from lmjax.models.mamba import Mamba, MambaConfig
from lmjax.models.rnn import RNN, RNNConfig
from lmjax.models.layers import REMAT_POLICIES
from lmjax.models.transformer import Transformer, TransformerConfig
from lmjax.registry import ConfigError, Registry

MODELS = Registry("implementation.model")
ATTENTIONS = Registry("implementation.attention")
for _name, _fn in ATTENTION_IMPLEMENTATIONS.items():
    ATTENTIONS.register(_name)(_fn)
INITS = ("normal", "fan_in")


def _check_transformer(cfg: TransformerConfig):
    if cfg.dim % cfg.n_heads or (cfg.dim // cfg.n_heads) % 2:
        raise ValueError(f"model.dim={cfg.dim} must split into model.n_heads={cfg.n_heads} heads of even size (RoPE).")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"model.n_heads={cfg.n_heads} must be a multiple of model.n_kv_heads={cfg.n_kv_heads}.")


def _check_mamba(cfg):
    from lmjax.models.mamba import check_config

    check_config(cfg)


def _check_rnn(cfg):
    from lmjax.models.rnn import check_config

    check_config(cfg)


# Sizes and constants of each family: (keys that must be positive, keys that may be 0 and what 0 means).
SIZES = {
    "transformer": (("n_heads", "n_kv_heads", "mlp_hidden", "rope_base", "norm_eps"),
                    {"attention_block": "0 = no block skipping"}),
    "mamba": (("d_state", "d_conv", "expand", "dt_min", "dt_max", "chunk_size", "norm_eps"),
              {"dt_rank": "0 = dim/16"}),
    "rnn": (("hawk_c", "chunk_size", "norm_eps"),
            {"width": "0 = dim", "d_conv": "0 = no conv", "mlp_hidden": "0 = 3*dim"}),
}


def _check_sizes(family, cfg):
    positive, zero_means = SIZES[family]
    whole = {f.name for f in dataclasses.fields(cfg) if f.type in (int, "int")}
    for key in (*positive, *zero_means):
        value = getattr(cfg, key)
        kind = int if key in whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"model.{key} must be a {'whole ' if key in whole else ''}number, got {value!r}.")
    for key in positive:
        if not getattr(cfg, key) > 0:  # NaN too
            raise ConfigError(f"model.{key} must be a positive number, got {getattr(cfg, key)!r}.")
    for key, meaning in zero_means.items():
        if getattr(cfg, key) < 0:
            raise ConfigError(f"model.{key} must be 0 or more ({meaning}), got {getattr(cfg, key)!r}.")
    if family == "mamba" and not cfg.dt_min <= cfg.dt_max:
        raise ConfigError(f"model.dt_min={cfg.dt_min!r} must not exceed model.dt_max={cfg.dt_max!r}.")


MODELS.register("transformer")((TransformerConfig, Transformer, _check_transformer))
MODELS.register("mamba")((MambaConfig, Mamba, _check_mamba))
MODELS.register("rnn")((RNNConfig, RNN, _check_rnn))


def model_config(implementation, section: dict):
    """The family's config from the `model` section: the keys the family has (recipes may carry
    other families' keys, so that `--config.implementation.model=mamba` works on them), the
    family's defaults for the rest; `implementation.attention` for transformers."""
    config_cls, _, check = MODELS.get(implementation.model)
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in dict(section).items() if k in names}
    if "attention" in names:
        values["attention"] = implementation.attention
    required = [f.name for f in dataclasses.fields(config_cls)
                if f.default is dataclasses.MISSING and f.name not in values]
    if required:
        raise ConfigError(f"Missing config key(s) {', '.join('model.' + k for k in required)}.")
    cfg = config_cls(**values)
    for key in ("dim", "n_layers", "vocab_size"):
        if isinstance(getattr(cfg, key), bool) or not isinstance(getattr(cfg, key), int) or getattr(cfg, key) <= 0:
            raise ConfigError(f"model.{key} must be a positive number, got {getattr(cfg, key)!r}.")
    if cfg.remat not in REMAT_POLICIES:
        raise ConfigError(f"Unknown remat policy {cfg.remat!r} in model.remat; choose one of: {', '.join(REMAT_POLICIES)}.")
    if cfg.init not in INITS:
        raise ConfigError(f"Unknown init scheme {cfg.init!r} in model.init; choose one of: {', '.join(INITS)}.")
    _check_sizes(implementation.model, cfg)
    try:
        check(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return cfg


def build_model(model_cfg):
    """The flax module for a family config (TransformerConfig, MambaConfig or RNNConfig)."""
    for config_cls, module_cls, _ in (MODELS.get(name) for name in MODELS.names()):
        if type(model_cfg) is config_cls:
            return module_cls(model_cfg)
    raise TypeError(f"No model family takes a {type(model_cfg).__name__}.")
