"""MetricWriter's tensorboard events: readable, and written without importing torch."""
import struct
import subprocess
import sys

WRITE_AND_REPORT = """
import sys
from lmjax.config import Logging
from lmjax.monitor.metrics import MetricWriter
writer = MetricWriter(sys.argv[1], Logging(tensorboard=True), run_config={})
writer.write(3, {"train/loss": 1.5})
writer.write(7, {"train/loss": 0.25})
writer.close()
print("torch loaded:", "torch" in sys.modules)
import torch  # still importable afterwards
print("torch importable:", torch.tensor([1.0]).item() == 1.0)
"""


def read_scalars(path):
    """(tag, step, value) of every scalar in a TFRecord event file, parsed with tensorboardX's
    protobuf classes (records: u64 length, u32 crc, payload, u32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    data, out, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_events_hold_the_scalars_and_torch_stays_unloaded(tmp_path):
    result = subprocess.run([sys.executable, "-c", WRITE_AND_REPORT, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torch loaded: False" in result.stdout and "torch importable: True" in result.stdout
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    assert read_scalars(events) == [("train/loss", 3, 1.5), ("train/loss", 7, 0.25)]
