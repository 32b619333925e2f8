"""Reading a training workdir: its config, its last (or a chosen) checkpoint, the model it trains.

Used by evaluation, generation and export. Layout written by `python -m moe_lvlm.train`:
`{workdir}/config.json` and `{workdir}/{stage}/checkpoints/{step}/...` for each stage of
`config.stages`.
"""

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from moe_lvlm.data import pipeline
from moe_lvlm.models.lvlm import LVLM, build_model
from moe_lvlm.train import stages as stages_lib
from moe_lvlm.train.loop import stage_names


class WorkdirError(FileNotFoundError):
    """The workdir lacks a config or a checkpoint that was asked for."""


@dataclasses.dataclass
class TrainedModel:
    config: ml_collections.ConfigDict
    model_config: ml_collections.ConfigDict
    model: LVLM
    params: Any
    tokenizer: pipeline.Tokenizer
    stage: str
    step: int


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise WorkdirError(f"{path} not found: is {workdir} a `python -m moe_lvlm.train` workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def latest_checkpoint(workdir: str | Path, stage: str | None = None) -> tuple[str, int]:
    """(stage, step) of the newest checkpoint: in `stage`, else in the last stage with one."""
    workdir = Path(workdir)
    names = stage_names(read_config(workdir))
    candidates = [stage] if stage else list(reversed(names))
    for name in candidates:
        if name not in names:
            raise WorkdirError(f"stage {name!r} is not one of {names} in {workdir}/config.json")
        directory = workdir / name / "checkpoints"
        if directory.exists():
            steps = ocp.utils.checkpoint_steps(directory)
            if steps:
                return name, max(steps)
    raise WorkdirError(f"no complete checkpoint under {workdir} (stages {candidates})")


def load_trained(
    workdir: str | Path, stage: str | None = None, step: int | None = None
) -> TrainedModel:
    """The model and parameters of a checkpoint (default: the newest), on the default device."""
    workdir = Path(workdir)
    cfg = read_config(workdir)
    names = stage_names(cfg)
    stage, latest = latest_checkpoint(workdir, stage)
    step = latest if step is None else step
    directory = (workdir / stage / "checkpoints").absolute()
    if step not in ocp.utils.checkpoint_steps(directory):
        raise WorkdirError(f"{directory} has no checkpoint {step}; it has "
                           f"{sorted(ocp.utils.checkpoint_steps(directory))}")
    tokenizer = pipeline.load_tokenizer(cfg.data)
    model_cfg = stages_lib.stage_model_config(cfg, names, names.index(stage))
    model_cfg.image_token_id = tokenizer.image_token_id
    with ocp.CheckpointManager(directory) as manager, warnings.catch_warnings():
        # Restoring onto the default device is what we want; orbax warns that no target sharding
        # was given.
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
    params = jax.tree.map(jax.numpy.asarray, restored["state"]["params"])
    return TrainedModel(
        config=cfg, model_config=model_cfg, model=build_model(model_cfg), params=params,
        tokenizer=tokenizer, stage=stage, step=step,
    )

