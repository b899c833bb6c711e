import types

import jax
import pytest

from lmjax.monitor import hardware


def test_measured_matmul_flops_is_2n3_over_the_median_timed_call(monkeypatch):
    # A fake clock: the matmuls run, but the three timed calls take 0.5, 0.25 and 1.0 s, so the
    # rate is 2 * 256^3 / 0.5 exactly; timing the warm-up calls, or a mean or min, gives another number.
    ticks = iter([0.0, 0.5, 10.0, 10.25, 20.0, 21.0])
    monkeypatch.setattr(hardware, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert hardware.measure_matmul_flops(n=256, repeats=3) == 2 * 256**3 / 0.5


def _device(kind):
    return types.SimpleNamespace(device_kind=kind)


@pytest.mark.parametrize("kind, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 80GB HBM3", "float32", 67e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v5", "bfloat16", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
])
def test_peak_table_lookup(kind, dtype, expected):
    assert hardware.peak_flops_for_device(_device(kind), dtype) == expected


@pytest.mark.parametrize("kind, dtype", [
    ("cpu", "bfloat16"), ("cpu", "float32"), ("Some Future Chip", "bfloat16"),
    ("TPU v4", "float32"),  # TPUs have no native f32 matmul peak
])
def test_unknown_peaks_are_none(kind, dtype):
    assert hardware.peak_flops_for_device(_device(kind), dtype) is None


def test_default_dtype_is_bfloat16():
    assert hardware.peak_flops_for_device(_device("TPU v4")) == 275e12


def test_flops_limit_measures_on_cpu(monkeypatch):
    device = jax.devices()[0]
    if hardware.peak_flops_for_device(device, "float32") is not None:
        pytest.skip("this device has a table peak")
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda **kw: 123.0)
    assert hardware.flops_limit(device) == (123.0, f"measured matmul ({device.device_kind})")
