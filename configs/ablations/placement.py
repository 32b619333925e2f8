"""Ablation: which decoder layers are MoE, every other (MoE-LLaVA) / all / first half / second half.

    python -m moe_lvlm.train --config=configs/ablations/placement.py:moe_layers=all --workdir=W
    python launch/sweep.py configs/ablations/placement.py --workdir=runs/ablations/placement

Other arguments: configs/ablations/common.py.
"""

from configs.ablations.common import ablation_config

AXIS = "moe_layers"
VALUES = ("every_other", "all", "first_half", "second_half")


def get_config(arg: str | None = None):
    return ablation_config(arg)
