"""The device mesh: axes ('data', 'model') sized from `parallel.data` / `parallel.model`.

Data parallelism splits the batch (and, for generation, the lanes) over `data`; tensor
parallelism splits attention heads, MLP hidden units and the vocabulary over `model`. With
`parallel.fsdp` the parameters and optimizer state are also split over `data` (see rules.py),
so FSDP needs no third axis: it reuses the data-parallel devices.
"""
import jax
from jax.sharding import AxisType, Mesh

from lmjax.registry import ConfigError

MESH_AXES = ("data", "model")


def mesh_shape(data: int, model: int, n_devices: int) -> tuple[int, int]:
    """(data, model) with one -1 resolved to the devices left; checked against `n_devices`."""
    if data == -1 and model == -1:
        raise ConfigError("Only one of parallel.data and parallel.model may be -1 (the devices left).")
    for key, size in (("parallel.data", data), ("parallel.model", model)):
        if size == 0 or size < -1:
            raise ConfigError(f"{key} must be a positive device count or -1 (the devices left), got {size}.")
    if -1 in (data, model):
        fixed = model if data == -1 else data
        if n_devices % fixed:
            raise ConfigError(f"{n_devices} devices do not split into parallel.data x parallel.model = {data} x {model}.")
        data, model = (n_devices // fixed, model) if data == -1 else (data, n_devices // fixed)
    if data * model != n_devices:
        raise ConfigError(
            f"parallel.data x parallel.model = {data} x {model} = {data * model} devices, but there are "
            f"{n_devices} ({jax.devices()[0].platform}); use -1 for one of them to take the rest."
        )
    return data, model


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    """The global mesh over all processes' devices (or `devices`); -1 = the devices left."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(data, model, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)
