"""orbax checkpoints of a stage: train state, data iterator position, config.

Layout: `{workdir}/{stage}/checkpoints/{step}/{state,data,config}`. orbax writes each step to a
temporary directory and renames it when complete, so a save killed half-way leaves the previous
checkpoints usable. The data iterator's position is captured when `save` is called (before the
asynchronous write) and stored per process, as grain does it.
"""

import json
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


class IteratorSnapshot:
    """A frozen `get_state()` of an iterator: what grain's orbax handler saves and restores."""

    def __init__(self, state: bytes | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:
        """grain's handler calls this after restoring; nothing to start for a snapshot."""


def encode_iterator_state(iterator: Any) -> bytes:
    state = iterator.get_state()
    return state if isinstance(state, bytes) else json.dumps(state).encode()


def decode_iterator_state(iterator: Any, state: bytes) -> None:
    """Sets a grain iterator (DataLoader: bytes state; dataset iterator: dict) to `state`."""
    if isinstance(iterator, grain.DatasetIterator):
        iterator.set_state(json.loads(state.decode()))
    else:
        iterator.set_state(state)


class StageCheckpoints:
    """Saves and restores one stage's checkpoints."""

    def __init__(self, directory: str | Path, max_to_keep: int, async_save: bool = True):
        self.directory = Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # what a save killed half-way left behind
        )
        self.manager = ocp.CheckpointManager(self.directory.absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, iterator: Any, config: ml_collections.ConfigDict) -> None:
        args = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(config.to_dict()),
        }
        if iterator is not None:
            snapshot = IteratorSnapshot(encode_iterator_state(iterator))
            args["data"] = grain.checkpoint.CheckpointSave(snapshot)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract_state: Any, iterator: Any = None) -> Any:
        """State at `step`, placed as `abstract_state` says (its shardings may be another mesh)."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        snapshot = IteratorSnapshot()
        # An imported checkpoint (moe_lvlm.import_checkpoint) has no data position: the data
        # then starts from its beginning.
        if iterator is not None and not (self.directory / str(step) / "data").exists():
            iterator = None
        if iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(snapshot)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if iterator is not None:
            decode_iterator_state(iterator, snapshot.state)
        return restored["state"]

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        args = ocp.args.Composite(config=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return ml_collections.ConfigDict(restored["config"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def latest_step(directory: str | Path) -> int | None:
    """The newest complete checkpoint step in `directory` (None if there is none)."""
    directory = Path(directory)
    steps = ocp.utils.checkpoint_steps(directory.absolute()) if directory.exists() else []
    return max(steps, default=None)


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restoring onto a mesh."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
