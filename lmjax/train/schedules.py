"""Learning-rate schedules: pure functions of the step (jnp scalars in, jnp scalars out)."""
import functools

import jax.numpy as jnp


def _warmup(step, warmup_steps):
    return jnp.minimum(1.0, (step + 1) / jnp.maximum(warmup_steps, 1))


def constant(step, *, peak, warmup_steps, total_steps, min_ratio, decay_fraction):
    return peak * _warmup(step, warmup_steps)


def cosine(step, *, peak, warmup_steps, total_steps, min_ratio, decay_fraction):
    progress = jnp.clip((step - warmup_steps) / jnp.maximum(total_steps - warmup_steps, 1), 0.0, 1.0)
    decay = min_ratio + (1 - min_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return peak * _warmup(step, warmup_steps) * decay


def linear(step, *, peak, warmup_steps, total_steps, min_ratio, decay_fraction):
    progress = jnp.clip((step - warmup_steps) / jnp.maximum(total_steps - warmup_steps, 1), 0.0, 1.0)
    return peak * _warmup(step, warmup_steps) * (1 - (1 - min_ratio) * progress)


def warmup_stable_decay(step, *, peak, warmup_steps, total_steps, min_ratio, decay_fraction):
    """Warmup, a flat plateau, then a linear decay over the last `decay_fraction` of training."""
    decay_steps = jnp.maximum(jnp.round(decay_fraction * total_steps), 1)
    decay_start = total_steps - decay_steps
    progress = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
    return peak * _warmup(step, warmup_steps) * (1 - (1 - min_ratio) * progress)


SCHEDULES = {"constant": constant, "cosine": cosine, "linear": linear, "wsd": warmup_stable_decay}


def make_schedule(name, *, peak, warmup_steps, total_steps, min_ratio=0.0, decay_fraction=0.2):
    """A function step -> learning rate, with every hyper-parameter bound."""
    fn = SCHEDULES[name]
    bound = functools.partial(
        fn, peak=peak, warmup_steps=warmup_steps, total_steps=total_steps,
        min_ratio=min_ratio, decay_fraction=decay_fraction,
    )
    return lambda step: bound(jnp.asarray(step, jnp.float32))
