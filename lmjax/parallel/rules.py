"""The one table from the model's logical axis names to mesh axes, and shardings from it.

Logical names (on every parameter, and on activations at block boundaries):
`batch, length, embed, heads, kv, mlp, vocab, layers`. Megatron-style tensor parallelism puts
heads, MLP hidden units and the vocabulary on `model`; data parallelism puts the batch on `data`.
FSDP adds `embed -> data` after `batch -> data`: flax gives each mesh axis to the first name of
an array that asks for it, so activations (which carry `batch`) keep `embed` whole while
parameters (which never carry `batch`) split `embed` over the data-parallel devices.
"""
import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec


def logical_rules(fsdp: bool = False) -> tuple:
    rules = [("batch", "data"), ("heads", "model"), ("mlp", "model"), ("vocab", "model")]
    if fsdp:
        rules.append(("embed", "data"))
    return tuple(rules)


def fitted_spec(shape, logical_names, mesh, rules) -> PartitionSpec:
    """The rules' PartitionSpec for an array, with a mesh axis dropped (that dimension
    replicated) where it does not divide the dimension: e.g. 3 kv heads on a 2-way `model` axis."""
    spec = nn.logical_to_mesh_axes(tuple(logical_names), rules)
    fitted = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = 1
        for name in names:
            ways *= mesh.shape[name]
        fitted.append(axes if names and size % ways == 0 else None)
    return PartitionSpec(*fitted)


def param_shardings(boxed_params, mesh, rules):
    """NamedShardings for a tree of flax-boxed (logically partitioned) parameters or shapes;
    the result has the structure of the unboxed tree."""
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, fitted_spec(leaf.value.shape, leaf.names, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def named_sharding(shape, logical_names, mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, fitted_spec(shape, logical_names, mesh, rules))
