"""orbax checkpoints of a stage: train state, data iterator position, config.

Layout: `{workdir}/{stage}/checkpoints/{step}/{state,data,config}`. orbax writes each step to a
temporary directory and renames it when complete, so a save killed half-way leaves the previous
checkpoints usable. The data iterator's position is captured when `save` is called (before the
asynchronous write) and stored per process, as grain does it (`data/process_{i}-of-{n}.json`):
it restores only with the same process count (`has_data_position`). The train state restores
onto any mesh and process count (`restore` with target shardings, `restore_single_device`).
Directories go through `moe_lvlm.paths` (local or gs://).

A checkpoint that does not restore (a truncated or zeroed data file, a missing manifest or state
folder) is moved aside to `{workdir}/{stage}/checkpoints_corrupt/{step}`, with one line saying so,
and the newest one that restores is used (`restore_newest`). Nothing is deleted.
"""

import json
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from moe_lvlm import paths

CORRUPT_DIR = "checkpoints_corrupt"


def is_resource_error(error: Exception) -> bool:
    """Out of memory: the machine's problem, not the checkpoint's."""
    return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error)


def short(error: Exception, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


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

    def __init__(self, directory: paths.PathLike, max_to_keep: int, async_save: bool = True):
        self.directory = paths.path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # what a save killed half-way left behind
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

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

    def has_data_position(self, step: int) -> bool:
        """Whether `step` holds this process's data position under this process count."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (self.directory / str(step) / "data" / name).exists()

    def restore(self, step: int, abstract_state: Any, iterator: Any = None) -> Any:
        """State at `step`, placed as `abstract_state` says (its shardings may be another mesh)."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        snapshot = IteratorSnapshot()
        if iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(snapshot)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if iterator is not None:
            decode_iterator_state(iterator, snapshot.state)
        return restored["state"]

    def restore_newest(self, abstract_state: Any, iterator: Any = None) -> tuple[int | None, Any]:
        """(step, state) of the newest checkpoint that restores, (None, None) if none does. Each
        newer one that fails to restore is moved aside (`move_aside`). `iterator` is set to the
        checkpoint's data position when it holds one for this process count."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            positioned = iterator if self.has_data_position(step) else None
            try:
                return step, self.restore(step, abstract_state, positioned)
            except Exception as e:
                if is_resource_error(e):
                    raise
                self.move_aside(step, e)
        return None, None

    def move_aside(self, step: int, error: Exception) -> paths.epath.Path:
        """Moves checkpoint `step` to `{stage}/checkpoints_corrupt/{step}` (process 0; every
        process waits for it) and says so in one line."""
        target = self.directory.parent / CORRUPT_DIR / str(step)
        if jax.process_index() == 0:
            if target.exists():
                target = target.with_name(f"{step}.{int(time.time())}")
            print(f"warning: checkpoint {step} in {self.directory} does not restore "
                  f"({short(error)}); moved it to {target}", flush=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"moe_lvlm.move_aside.{step}")
        self.manager.reload()
        return target

    def delete(self, step: int) -> None:
        self.manager.delete(step)

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        args = ocp.args.Composite(config=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return ml_collections.ConfigDict(restored["config"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def latest_step(directory: paths.PathLike) -> int | None:
    """The newest complete checkpoint step in `directory` (None if there is none)."""
    directory = paths.path(directory)
    steps = ocp.utils.checkpoint_steps(directory) if directory.exists() else []
    return max(steps, default=None)


def restore_params(directory: paths.PathLike, step: int) -> Any:
    """The parameters of checkpoint `step` (not the optimizer state), every array whole on this
    process's first device, whatever mesh and process count wrote them: the target shapes and
    dtypes come from the checkpoint's metadata. The item is read with its handler: a
    Checkpointer would look for step metadata inside the item folder and warn that it is missing
    (it lives one level up, in the step folder the CheckpointManager wrote)."""
    path = paths.path(directory) / str(step) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(path).tree
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {"params": jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree["params"])}
        args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)
        return handler.restore(path, args=args)["params"]
    finally:
        handler.close()


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restoring onto a mesh."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
