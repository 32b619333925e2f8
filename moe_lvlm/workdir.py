"""Reading a training workdir: its config, its last (or a chosen) checkpoint, the model it trains.

Used by evaluation, generation and export. Layout written by `python -m moe_lvlm.train`:
`{workdir}/config.json` and `{workdir}/{stage}/checkpoints/{step}/...` for each stage of
`config.stages`; local or gs:// (`moe_lvlm.paths`). A checkpoint written by any mesh and
process count loads onto this process's first device.
"""

import dataclasses
import json
import sys
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from moe_lvlm import paths
from moe_lvlm.cli import UserError
from moe_lvlm.data import pipeline
from moe_lvlm.models.lvlm import LVLM, build_model
from moe_lvlm.train import stages as stages_lib
from moe_lvlm.train.checkpoint import is_resource_error, restore_params, short
from moe_lvlm.train.loop import stage_names


class WorkdirError(UserError, FileNotFoundError):
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


def read_config(workdir: paths.PathLike) -> ml_collections.ConfigDict:
    path = paths.path(workdir) / "config.json"
    if not path.exists():
        raise WorkdirError(f"{path} not found: is {workdir} a `python -m moe_lvlm.train` workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def latest_checkpoint(workdir: paths.PathLike, stage: str | None = None) -> tuple[str, int]:
    """(stage, step) of the newest checkpoint: in `stage`, else in the last stage with one."""
    workdir = paths.path(workdir)
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
    workdir: paths.PathLike, stage: str | None = None, step: int | None = None
) -> TrainedModel:
    """The model and parameters of a checkpoint (default: the newest), on the first device."""
    workdir = paths.path(workdir)
    cfg = read_config(workdir)
    names = stage_names(cfg)
    stage, latest = latest_checkpoint(workdir, stage)
    explicit, step = step, latest if step is None else step
    directory = workdir / stage / "checkpoints"
    if step not in ocp.utils.checkpoint_steps(directory):
        raise WorkdirError(f"{directory} has no checkpoint {step}; it has "
                           f"{sorted(ocp.utils.checkpoint_steps(directory))}")
    tokenizer = pipeline.load_tokenizer(cfg.data, workdir)
    model_cfg = stages_lib.stage_model_config(cfg, names, names.index(stage))
    model_cfg.image_token_id = tokenizer.image_token_id
    # The newest checkpoint that restores, unless a step was asked for (a training restart moves
    # the others aside; this only reads).
    candidates = sorted((s for s in ocp.utils.checkpoint_steps(directory) if s <= step),
                        reverse=True) if explicit is None else [step]
    for candidate in candidates:
        try:
            params = restore_params(directory, candidate)
            step = candidate
            break
        except Exception as e:
            if is_resource_error(e):
                raise
            if explicit is not None or candidate == candidates[-1]:
                raise WorkdirError(f"checkpoint {candidate} in {directory} does not restore "
                                   f"({short(e)})") from e
            print(f"warning: checkpoint {candidate} in {directory} does not restore "
                  f"({short(e)}); using an older one", file=sys.stderr, flush=True)
    return TrainedModel(
        config=cfg, model_config=model_cfg, model=build_model(model_cfg), params=params,
        tokenizer=tokenizer, stage=stage, step=step,
    )
