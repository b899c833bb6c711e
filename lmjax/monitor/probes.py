"""Training probes: per-layer activation RMS, per-parameter weight norms and update/weight ratios.

Pure functions of arrays, called inside the jitted train step when `logging.probes_every > 0`
(the values are then fetched to the host only every `probes_every` steps). Names are uniform
across layouts: a parameter of the second layer is `layer_1/attention/wq` whether the layers are
unrolled (`layer_1/...`) or stacked by `nn.scan` (`layers/...`, leading axis = layer).

    probe/act_rms/layer_1              RMS over features and real tokens of layer 1's output
    probe/weight_norm/layer_1/mlp/w_up Frobenius norm of the parameter after the update
    probe/update_ratio/layer_1/mlp/w_up ||update|| / ||parameter before the update||
"""
import jax.numpy as jnp
from flax import traverse_util

STACKED = "layers"  # the nn.scan scope whose leaves carry a leading layer axis


def per_layer_leaves(tree) -> dict:
    """{'layer_1/attention/wq': array} from nested dicts (params, updates), unstacking `layers/...` leaves."""
    named = {}
    for keys, leaf in traverse_util.flatten_dict(tree).items():
        if keys[0] == STACKED:
            for i in range(leaf.shape[0]):
                named["/".join((f"layer_{i}", *keys[1:]))] = leaf[i]
        else:
            named["/".join(keys)] = leaf
    return named


def _norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def weight_norms(params) -> dict:
    return {f"probe/weight_norm/{name}": _norm(leaf) for name, leaf in per_layer_leaves(params).items()}


def update_ratios(updates, params_before) -> dict:
    """||update|| / ||parameter||, per parameter (0 where the parameter is all zeros)."""
    before = per_layer_leaves(params_before)
    ratios = {}
    for name, update in per_layer_leaves(updates).items():
        norm = _norm(before[name])
        ratios[f"probe/update_ratio/{name}"] = jnp.where(norm > 0, _norm(update) / jnp.where(norm > 0, norm, 1.0), 0.0)
    return ratios


def activation_sums(intermediates, mask_BxL) -> dict:
    """Per layer, (sum of the sown mean squares over real tokens, number of real tokens); sums
    add up across micro-batches, `activation_rms` turns them into RMS values."""
    mask = mask_BxL.astype(jnp.float32)
    sums = {}
    for name, sown in per_layer_leaves(_activation_ms_only(intermediates)).items():
        layer = name.split("/")[0]
        sums[layer] = (jnp.sum(sown * mask), jnp.sum(mask))
    return sums


def _activation_ms_only(intermediates):
    """{'layer_0': {'activation_ms': (x,)}} or {'layers': {...}} -> {'layer_0': x} / {'layers': x}."""
    return {scope: values["activation_ms"][0] for scope, values in intermediates.items() if "activation_ms" in values}


def activation_rms(sums) -> dict:
    return {f"probe/act_rms/{layer}": jnp.sqrt(total / jnp.maximum(count, 1.0)) for layer, (total, count) in sums.items()}
