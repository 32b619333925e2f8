"""The run config a workdir holds (its config.json), to continue it with more stages or steps:

    python -m moe_lvlm.train --config=configs/workdir.py:W --workdir=W --config.stage3.num_steps=N
"""

import json
from pathlib import Path

import ml_collections


def get_config(workdir: str):
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: configs/workdir.py:W takes a workdir")
    cfg = ml_collections.ConfigDict(json.loads(path.read_text()))
    # JSON keeps no type for a None field: make it overridable as configs/base.py does.
    cfg.data.system_prompt = ml_collections.FieldReference(
        cfg.data.system_prompt, field_type=str
    )
    return cfg
