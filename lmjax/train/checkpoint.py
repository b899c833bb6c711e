"""orbax checkpoints: train state (params, optimizer, step, PRNG) plus the data iterator position."""
from pathlib import Path

import orbax.checkpoint as ocp


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
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()

    def restore(self, abstract_state, step=None):
        """(state, data_state) at `step` (default: latest), laid out like `abstract_state`."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["data"]

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
