"""Learning-rate schedules: pure functions of the step (jnp scalars in, jnp scalars out).

Each is peak x warmup(step) x decay(step).

- The warmup ramp is lmjax's own, min(1, (step + 1) / warmup_steps): step 0 already trains at
  peak / warmup_steps and the peak comes at step warmup_steps - 1. optax's ramps
  (`linear_schedule`, `warmup_cosine_decay_schedule`) give 0 at step 0 and the peak one step
  later, which would change every warmup step.
- The cosine decay is optax's (`piecewise_interpolate_schedule`, from 1 at the end of the
  warmup to min_ratio at total_steps), bit-identical in float32, eager and under jit, to the
  formula lmjax used before it (min_ratio + (1 - min_ratio) / 2 * (1 + cos(pi * progress))).
- The linear decays (linear, wsd) stay written out: optax's linear interpolation,
  (end - start) * t + start, rounds differently under jit from 1 - (1 - min_ratio) * t (up to
  a few float32 ulps), and runs must reproduce bit for bit.
"""
import functools

import jax.numpy as jnp
import optax


def _warmup(step, warmup_steps):
    return jnp.minimum(1.0, (step + 1) / jnp.maximum(warmup_steps, 1))


def _progress(step, start, length):
    """0 up to `start`, then rising linearly to 1 over `length` steps (at least one)."""
    return jnp.clip((step - start) / jnp.maximum(length, 1), 0.0, 1.0)


def constant(step, *, peak, warmup_steps, total_steps, min_ratio, decay_fraction):
    return peak * _warmup(step, warmup_steps)


def cosine(step, *, peak, warmup_steps, total_steps, min_ratio, decay_fraction):
    decay_end = warmup_steps + max(total_steps - warmup_steps, 1)
    decay = optax.piecewise_interpolate_schedule("cosine", 1.0, {warmup_steps: 1.0, decay_end: min_ratio})
    return peak * _warmup(step, warmup_steps) * decay(step)


def linear(step, *, peak, warmup_steps, total_steps, min_ratio, decay_fraction):
    progress = _progress(step, warmup_steps, total_steps - warmup_steps)
    return peak * _warmup(step, warmup_steps) * (1 - (1 - min_ratio) * progress)


def warmup_stable_decay(step, *, peak, warmup_steps, total_steps, min_ratio, decay_fraction):
    """Warmup, a flat plateau, then a linear decay over the last `decay_fraction` of training."""
    decay_steps = jnp.maximum(jnp.round(decay_fraction * total_steps), 1)
    progress = _progress(step, total_steps - decay_steps, decay_steps)
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
