"""Ablation: experts per MoE layer, 1 (dense baseline) / 2 / 4 / 8, top-2 routing.

    python -m moe_lvlm.train --config=configs/ablations/experts.py:num_experts=8 --workdir=W
    python launch/sweep.py configs/ablations/experts.py --workdir=runs/ablations/experts

Other arguments: configs/ablations/common.py.
"""

from configs.ablations.common import ablation_config

AXIS = "num_experts"
VALUES = (1, 2, 4, 8)


def get_config(arg: str | None = None):
    return ablation_config(arg)
