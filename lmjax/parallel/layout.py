"""`Layout`: a mesh plus the rules table, and what the trainer and decoder need from them.

Jitted functions run inside `layout.context()` (the mesh and the rules), so the model's
`nn.with_logical_constraint` calls turn into sharding constraints while tracing; outside it
they are no-ops. Eager code never runs inside the context (jax would then place every new
array on the whole mesh).
"""
import contextlib
import dataclasses

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmjax.parallel.mesh import make_mesh
from lmjax.parallel.rules import logical_rules, named_sharding, param_shardings
from lmjax.registry import ConfigError


@dataclasses.dataclass(frozen=True)
class Layout:
    mesh: Mesh
    rules: tuple

    @classmethod
    def from_devices(cls, data: int = -1, model: int = 1, fsdp: bool = False, devices=None):
        """A data x model mesh (-1 = the devices left) with the logical-axis rules (fsdp: parameters
        and optimizer state split over `data` too)."""
        return cls(make_mesh(data, model, devices), logical_rules(fsdp))

    @classmethod
    def single_device(cls, device=None):
        device = device or jax.devices()[0]
        mesh = Mesh(np.asarray([[device]]), ("data", "model"))
        return cls(mesh, logical_rules())

    @property
    def data_size(self) -> int:
        return self.mesh.shape["data"]

    @contextlib.contextmanager
    def context(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def jit(self, fn, **jit_kwargs):
        """`jax.jit(fn, **jit_kwargs)`, called inside this layout's context."""
        jitted = jax.jit(fn, **jit_kwargs)

        def call(*args):
            with self.context():
                return jitted(*args)

        call.jitted = jitted
        return call

    # -- shardings ----------------------------------------------------------------------------

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def rows(self) -> NamedSharding:
        """Arrays whose leading axis is the batch (or the lanes): split over `data`."""
        return NamedSharding(self.mesh, PartitionSpec("data"))

    def sharding(self, shape, logical_names) -> NamedSharding:
        return named_sharding(shape, logical_names, self.mesh, self.rules)

    def param_shardings(self, boxed_params):
        return param_shardings(boxed_params, self.mesh, self.rules)

    def check_rows(self, n: int, what: str):
        if n % self.data_size:
            raise ConfigError(f"{what}={n} must be divisible by the {self.data_size} data-parallel devices (parallel.data).")

    # -- host data -> global arrays -----------------------------------------------------------

    def put_rows(self, tree):
        """Host arrays every process holds in full -> arrays split by rows over `data`."""
        return jax.tree_util.tree_map(lambda x: _from_global(np.asarray(x), self.rows()), tree)

    def put_params(self, host_params, shardings):
        """Full host parameters (every process holds them, e.g. imported weights) -> arrays on
        `shardings`; each process places only the shards its devices hold."""
        return jax.tree_util.tree_map(lambda x, s: _from_global(np.asarray(x), s), host_params, shardings)

    def put_local_rows(self, tree, global_rows: int):
        """This process's rows (see `process_rows`) -> global arrays split by rows over `data`."""
        def one(x):
            x = np.asarray(x)
            return jax.make_array_from_process_local_data(self.rows(), x, (global_rows,) + x.shape[1:])

        return jax.tree_util.tree_map(one, tree)

    def process_rows(self, global_rows: int) -> tuple[int, int]:
        """The rows [start, stop) of a row-split array this process's devices hold."""
        return self.row_spans(global_rows)[jax.process_index()]

    def row_spans(self, global_rows: int) -> dict:
        """process index -> rows [start, stop) its devices hold (contiguous on every mesh
        jax.make_mesh builds: a process's devices are neighbours along `data`)."""
        spans = {}
        for device, index in self.rows().devices_indices_map((global_rows,)).items():
            start, stop, _ = index[0].indices(global_rows)
            old = spans.get(device.process_index, (start, stop))
            spans[device.process_index] = (min(old[0], start), max(old[1], stop))
        return spans


def _from_global(x, sharding):
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

