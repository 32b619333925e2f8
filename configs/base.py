"""Every knob of a run, with its default. Presets and the demo are small overrides of this.

Sections:
  model   architecture (see configs/models.py for the fields of each part)
  mesh    device mesh sizes over ('data', 'fsdp', 'expert', 'tensor'); -1 takes the rest
  data    input pipeline
  stages  the MoE-tuning stages, run in order (configs/stages.py)
"""

import ml_collections

from configs import models


def mesh_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))


def data_config() -> ml_collections.ConfigDict:
    """Input pipeline defaults (moe_lvlm/data)."""
    return ml_collections.ConfigDict(
        dict(
            seq_len=128,
            template="vicuna_v1",
            tokenizer="",
            aspect="pad",
            packing=False,
            bad_records="skip",
            num_workers=0,
            prefetch=2,
            seed=0,
        )
    )


def get_base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = models.tiny()
    cfg.mesh = mesh_config()
    cfg.data = data_config()
    cfg.seed = 0
    return cfg
