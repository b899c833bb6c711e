"""orbax checkpoints: train state (params, optimizer, step, PRNG) plus the data iterator position.

The train state is saved sharded (every process writes its own shards) and restored onto the
shardings of whatever abstract state is passed: another mesh, or one device. Each process's
data position goes to its own file (grain's per-process checkpoint handler), since in a
multi-host run every process reads different input shards.
"""
import json
from pathlib import Path

import grain
import orbax.checkpoint as ocp


class _DataPosition:
    """A snapshot of an iterator position in the shape grain's handler saves and restores."""

    def __init__(self, state=None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes):
        self.state = json.loads(state)

    def start_prefetch(self):  # part of the handler's protocol; nothing runs ahead here
        pass


class Checkpointer:
    def __init__(self, directory, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, wait: bool = False):
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_DataPosition(data_state))
            ),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()

    def restore(self, abstract_state, step=None, *, data=True):
        """(state, data_state) at `step` (default: latest), laid out like `abstract_state`
        (shapes, dtypes and shardings). `data=False` skips the data position (data_state None)."""
        step = self.latest_step() if step is None else step
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        position = _DataPosition()
        if data:
            items["data"] = grain.checkpoint.CheckpointRestore(position)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as error:
            if "process_" in str(error) and "does not exist" in str(error):
                raise ValueError(
                    f"Checkpoint {step} holds no data position for this process ({error}); it was written "
                    f"by a different number of processes. Resume with the same process count."
                ) from None
            raise
        return restored["state"], position.state

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
