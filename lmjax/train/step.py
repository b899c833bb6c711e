"""The train step (state, batch) -> (state, metrics), jitted once with the state donated.

A batch is a dict of [B, L] int32 arrays: inputs, targets, loss_mask, and for packed rows
segment_ids and positions. Gradient accumulation splits B into `grad_accum` micro-batches that
run under lax.scan, so one call is always one optimizer update.
"""
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key; fold in the step for any randomness


def token_losses(apply_fn, params, batch):
    """Per-token cross-entropy [B, L] (f32) and the logits."""
    logits = apply_fn(
        {"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids"), batch.get("prompt")
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]), logits


def make_train_step(apply_fn, tx, schedule, grad_accum: int = 1, *, layout=None, shardings=None):
    """The jitted step. With a `layout` (lmjax.parallel.layout) and the state's `shardings`, it
    takes and returns the state sharded like that, takes batches split by rows over `data`,
    and traces under the layout's mesh and rules (so activation constraints apply)."""
    def summed_loss(params, micro):
        losses, _ = token_losses(apply_fn, params, micro)
        mask = micro["loss_mask"].astype(jnp.float32)
        return jnp.sum(losses * mask)

    def train_step(state: TrainState, batch):
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1).astype(jnp.float32)
        grad_fn = jax.value_and_grad(summed_loss)
        if grad_accum == 1:
            loss_sum, grads = grad_fn(state.params, batch)
        else:
            micro_batches = jax.tree_util.tree_map(
                lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch
            )

            def accumulate(carry, micro):
                loss_sum, grads = grad_fn(state.params, micro)
                return jax.tree_util.tree_map(jnp.add, carry, (loss_sum, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
            (loss_sum, grads), _ = jax.lax.scan(accumulate, zeros, micro_batches)
        grads = jax.tree_util.tree_map(lambda g: g / n_tokens, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "train/loss": loss_sum / n_tokens,
            "train/grad_norm": optax.tree.norm(grads),
            "train/lr": schedule(state.step),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if layout is None:
        return jax.jit(train_step, donate_argnums=0)
    return layout.jit(
        train_step, donate_argnums=0, in_shardings=(shardings, layout.rows()), out_shardings=(shardings, layout.replicated)
    )
