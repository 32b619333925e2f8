"""What every ablation config shares: a base run (the CPU demo, or MoE-LLaVA at pod scale) with
the MoE knobs that the sweeps vary.

Arguments of every `configs/ablations/*.py` file (each sweeps one of the first four):
  num_experts  experts per MoE layer; 1 = the dense baseline (no MoE layers, top_k=1)
  top_k        experts per token
  moe_layers   which decoder layers are MoE: every_other, all, first_half, second_half
  dispatch     dropless or capacity
  scale        demo (configs/demo.py, CPU) or pod (MoE-LLaVA-1.6Bx4 with the paper's stage
               steps and batches; set the data mixtures and mesh on the command line)
  steps        multiplies every stage's step count
"""

import ml_collections

from configs import base, demo, models, stages
from moe_lvlm.config import ConfigError, parse_arg

SCALES = ("demo", "pod")
DEFAULTS = dict(num_experts=4, top_k=2, moe_layers="every_other", dispatch="dropless")


def pod_config() -> ml_collections.ConfigDict:
    """MoE-LLaVA-1.6Bx4-Top2 recipe: the paper's stage steps, batches and learning rates."""
    cfg = base.get_base_config()
    cfg.model = models.moe_llava_1p6bx4()
    cfg.update(stages.moe_llava())
    cfg.stages = "stage1,stage2,stage3"
    return cfg


def ablation_config(arg: str | None) -> ml_collections.ConfigDict:
    """The run config of one sweep point (`arg` as in the module docstring)."""
    args = parse_arg(arg, scale="demo", steps=1.0, **DEFAULTS)
    if args.scale not in SCALES:
        raise ConfigError(f"scale={args.scale!r} is not one of {SCALES}")
    if args.num_experts < 1:
        raise ConfigError(f"num_experts={args.num_experts} must be >= 1 (1 = dense)")
    if args.scale == "demo":
        cfg = demo.get_config(f"steps={args.steps}")
    else:
        cfg = pod_config()
        for name in cfg.stages.split(","):
            cfg[name].num_steps = max(1, round(cfg[name].num_steps * args.steps))
    dense = args.num_experts == 1
    cfg.model.moe.update(
        num_experts=args.num_experts, top_k=1 if dense else args.top_k, dispatch=args.dispatch
    )
    cfg.model.decoder.moe_layers = "none" if dense else args.moe_layers
    return cfg
