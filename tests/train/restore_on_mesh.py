"""Restores a training workdir's newest checkpoint of a stage onto an 8-device mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train/restore_on_mesh.py \
        WORKDIR STAGE OUT

Mesh data=1, fsdp=2, expert=2, tensor=2. Writes OUT.npz (the parameters, keys with '/' as '|')
and OUT.json (step, device count, each parameter's shard shape on the first device).
"""

import json
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from moe_lvlm.config import validate
from moe_lvlm.data import pipeline
from moe_lvlm.parallel.mesh import make_mesh
from moe_lvlm.train.loop import StageRunner, stage_names
from moe_lvlm.train.stages import flatten


def main(workdir: str, stage: str, out: str) -> None:
    cfg = ml_collections.ConfigDict(json.loads((Path(workdir) / "config.json").read_text()))
    cfg.mesh.update(data=1, fsdp=2, expert=2, tensor=2)
    mesh = make_mesh(validate(cfg, jax.device_count()))
    runner = StageRunner(cfg, stage, stage_names(cfg), Path(workdir), mesh,
                         pipeline.load_tokenizer(cfg.data))
    step = runner.ckpt.latest_step()
    params = flatten(runner.ckpt.restore(step, runner.abstract)["params"])
    runner.close()
    np.savez(f"{out}.npz", **{k.replace("/", "|"): np.asarray(v) for k, v in params.items()})
    shards = {k: list(v.addressable_shards[0].data.shape) for k, v in params.items()}
    Path(f"{out}.json").write_text(
        json.dumps({"step": step, "devices": jax.device_count(), "shards": shards}))


if __name__ == "__main__":
    main(*sys.argv[1:])
