"""optax AdamW with a weight-decay mask, gradient clipping and a step-function schedule."""
import jax
import optax

from lmjax.optim.schedules import make_schedule

# Norm scales, biases and the recurrences' own dynamics (Mamba's A_log, D, dt_bias; Hawk's
# lambda and gate biases) are not decayed: shrinking them changes time constants, not capacity.
NO_DECAY_PARAM_NAMES = ("scale", "bias", "conv_bias", "dt_bias", "A_log", "D", "lambda", "b_a", "b_i")


def weight_decay_mask(params):
    def decays(path, _):
        return getattr(path[-1], "key", None) not in NO_DECAY_PARAM_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps):
    """Returns (optax transformation, schedule function)."""
    schedule = make_schedule(
        optim_cfg.schedule,
        peak=optim_cfg.lr,
        warmup_steps=optim_cfg.warmup_steps,
        total_steps=total_steps,
        min_ratio=optim_cfg.min_lr_ratio,
        decay_fraction=optim_cfg.decay_fraction,
    )
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay, mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts), schedule
