r"""Ablation: how the chosen experts' outputs are weighed, top-2 with 4 experts and capacity
dispatch (so that drops happen and renorm_kept differs from renorm_chosen): raw router
probabilities (softmax) / renormalised over the two chosen (GShard) / over the choices kept after
the capacity drop (DeepSpeed top2gating, MoE-LLaVA).

    python -m moe_lvlm.train \
        --config=configs/ablations/combine_weights.py:combine_weights=softmax --workdir=W
    python launch/sweep.py configs/ablations/combine_weights.py \
        --workdir=runs/ablations/combine_weights

Other arguments: configs/ablations/common.py.
"""

from configs.ablations.common import ablation_config

AXIS = "combine_weights"
VALUES = ("softmax", "renorm_chosen", "renorm_kept")


def get_config(arg: str | None = None):
    return ablation_config(arg, dispatch="capacity")
