"""The train step (state, batch) -> (state, metrics), jitted once with the state donated.

A batch is a dict of [B, L] int32 arrays: inputs, targets, loss_mask, and for packed rows
segment_ids and positions. Gradient accumulation splits B into `grad_accum` micro-batches that
run under lax.scan, so one call is always one optimizer update.
"""
import flax.struct
import jax
import jax.numpy as jnp
import optax

from lmjax.monitor import probes as probe_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key; fold in the step for any randomness


def token_losses(apply_fn, params, batch, *, with_intermediates=False):
    """Per-token cross-entropy [B, L] (f32) and the logits (and, when asked, the model's sown
    'intermediates', for the probes)."""
    args = (batch["inputs"], batch.get("positions"), batch.get("segment_ids"), batch.get("prompt"))
    if with_intermediates:
        logits, variables = apply_fn({"params": params}, *args, mutable=["intermediates"])
    else:
        logits, variables = apply_fn({"params": params}, *args), {}
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    if with_intermediates:
        return losses, logits, variables.get("intermediates", {})
    return losses, logits


def make_train_step(apply_fn, tx, schedule, grad_accum: int = 1, *, layout=None, shardings=None, probes=False):
    """The jitted step. With a `layout` (lmjax.parallel.layout) and the state's `shardings`, it
    takes and returns the state sharded like that, takes batches split by rows over `data`,
    and traces under the layout's mesh and rules (so activation constraints apply).
    `probes`: also return `probe/...` metrics (lmjax.monitor.probes) every step."""
    def summed_loss(params, micro):
        mask = micro["loss_mask"].astype(jnp.float32)
        if not probes:
            losses, _ = token_losses(apply_fn, params, micro)
            return jnp.sum(losses * mask), {}
        losses, _, intermediates = token_losses(apply_fn, params, micro, with_intermediates=True)
        real_BxL = micro.get("segment_ids", jnp.ones_like(micro["inputs"])) != 0
        return jnp.sum(losses * mask), probe_lib.activation_sums(intermediates, real_BxL)

    def train_step(state: TrainState, batch):
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1).astype(jnp.float32)
        grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
        if grad_accum == 1:
            (loss_sum, activations), grads = grad_fn(state.params, batch)
        else:
            micro_batches = jax.tree_util.tree_map(
                lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch
            )

            def accumulate(carry, micro):
                return jax.tree_util.tree_map(jnp.add, carry, grad_fn(state.params, micro)), None

            zeros = jax.tree_util.tree_map(
                jnp.zeros_like, jax.eval_shape(grad_fn, state.params, jax.tree_util.tree_map(lambda x: x[0], micro_batches))
            )
            ((loss_sum, activations), grads), _ = jax.lax.scan(accumulate, zeros, micro_batches)
        grads = jax.tree_util.tree_map(lambda g: g / n_tokens, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "train/loss": loss_sum / n_tokens,
            "train/grad_norm": optax.tree.norm(grads),
            "train/lr": schedule(state.step),
        }
        if probes:
            metrics.update(probe_lib.activation_rms(activations))
            metrics.update(probe_lib.weight_norms(params))
            metrics.update(probe_lib.update_ratios(updates, state.params))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if layout is None:
        return jax.jit(train_step, donate_argnums=0)
    return layout.jit(
        train_step, donate_argnums=0, in_shardings=(shardings, layout.rows()), out_shardings=(shardings, layout.replicated)
    )
