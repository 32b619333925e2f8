"""Re-saves the stage3 checkpoint of a workdir from a multi-process job, each array sharded over
every device of every process along its first axis (where that divides):

    python launch/local.py --num-processes=2 --devices-per-process=2 \
        tests.generate.save_sharded SRC DST STEP

DST gets SRC's config.json and the checkpoint as step STEP, written by all processes together.
"""

import shutil
import sys

from moe_lvlm.parallel import distributed


def main(src: str, dst: str, step: str) -> None:
    distributed.initialize_from_env()
    import jax  # noqa: PLC0415  (after the distributed runtime is up)
    import numpy as np  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    from moe_lvlm.train.checkpoint import StageCheckpoints, latest_step, restore_params  # noqa: PLC0415
    from moe_lvlm.workdir import read_config  # noqa: PLC0415

    source = f"{src}/stage3/checkpoints"
    params = jax.tree.map(np.asarray, restore_params(source, latest_step(source)))
    mesh = jax.make_mesh((jax.device_count(),), ("x",))

    def shard(a):
        split = a.ndim and a.shape[0] % jax.device_count() == 0
        sharding = NamedSharding(mesh, P("x") if split else P())
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    sharded = jax.tree.map(shard, params)
    assert any(not x.is_fully_addressable for x in jax.tree.leaves(sharded))
    ckpt = StageCheckpoints(f"{dst}/stage3/checkpoints", max_to_keep=1, async_save=False)
    ckpt.save(int(step), {"params": sharded}, None, read_config(src))
    ckpt.close()
    if jax.process_index() == 0:
        shutil.copy(f"{src}/config.json", f"{dst}/config.json")


if __name__ == "__main__":
    main(*sys.argv[1:])
