"""Ablation: MoE dispatch, dropless (sort + grouped matmul) / capacity (GShard einsum, drops).

    python -m moe_lvlm.train --config=configs/ablations/dispatch.py:dispatch=capacity --workdir=W
    python launch/sweep.py configs/ablations/dispatch.py --workdir=runs/ablations/dispatch

Other arguments: configs/ablations/common.py.
"""

from configs.ablations.common import ablation_config

AXIS = "dispatch"
VALUES = ("dropless", "capacity")


def get_config(arg: str | None = None):
    return ablation_config(arg)
