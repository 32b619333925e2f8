"""Ablation: the MoE-tuning stages, as MoE-LLaVA's paper varies them: all three / without stage
I (stage II trains a fresh projector with the LLM) / without stage II (stage III upcycles the
model of stage I), 4 experts top-2.

    python -m moe_lvlm.train --config=configs/ablations/stages.py:recipe=no_stage2 --workdir=W
    python launch/sweep.py configs/ablations/stages.py --workdir=runs/ablations/stages

Other arguments: configs/ablations/common.py.
"""

from configs.ablations.common import ablation_config

AXIS = "recipe"
VALUES = ("full", "no_stage1", "no_stage2")


def get_config(arg: str | None = None):
    return ablation_config(arg)
