"""Ablation: experts per token, top-1 / top-2, with 4 experts.

    python -m moe_lvlm.train --config=configs/ablations/top_k.py:top_k=1 --workdir=W
    python launch/sweep.py configs/ablations/top_k.py --workdir=runs/ablations/top_k

Other arguments: configs/ablations/common.py.
"""

from configs.ablations.common import ablation_config

AXIS = "top_k"
VALUES = (1, 2)


def get_config(arg: str | None = None):
    return ablation_config(arg)
