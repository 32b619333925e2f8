"""What every ablation config shares: a base run (the CPU demo, or MoE-LLaVA at pod scale) with
the MoE knobs that the sweeps vary.

Arguments of every `configs/ablations/*.py` file (each sweeps one of the first six):
  num_experts      experts per MoE layer; 1 = the dense baseline (no MoE layers, top_k=1)
  top_k            experts per token
  moe_layers       which decoder layers are MoE: every_other, all, first_half, second_half
  dispatch         dropless or capacity
  combine_weights  auto, softmax, renorm_chosen or renorm_kept (configs/models.py)
  recipe           which MoE-tuning stages run: full (I, II, III), no_stage1 (II starts fresh,
                   then III), no_stage2 (III upcycles stage I's model)
  scale        demo (configs/demo.py, CPU) or pod (MoE-LLaVA-1.6Bx4 with the paper's stage
               steps and batches; set the data mixtures and mesh on the command line)
  steps        multiplies every stage's step count
"""

import ml_collections

from configs import base, demo, models, stages
from moe_lvlm.config import ConfigError, parse_arg

SCALES = ("demo", "pod")
ABLATION_STAGE3_STEPS = 1200  # stage III of the demo-scale sweeps (see ablation_config)
DEFAULTS = dict(num_experts=4, top_k=2, moe_layers="every_other", dispatch="dropless",
                combine_weights="auto", recipe="full")
RECIPES = ("full", "no_stage1", "no_stage2")


def pod_config() -> ml_collections.ConfigDict:
    """MoE-LLaVA-1.6Bx4-Top2 recipe: the paper's stage steps, batches and learning rates."""
    cfg = base.get_base_config()
    cfg.model = models.moe_llava_1p6bx4()
    cfg.update(stages.moe_llava())
    cfg.stages = "stage1,stage2,stage3"
    return cfg


def apply_recipe(cfg: ml_collections.ConfigDict, recipe: str) -> None:
    """Drops stage I or II from the three-stage recipe (MoE-LLaVA's stage ablation)."""
    if recipe not in RECIPES:
        raise ConfigError(f"recipe={recipe!r} is not one of {RECIPES}")
    if recipe == "no_stage1":  # stage II trains a fresh projector with the LLM
        cfg.stages = "stage2,stage3"
        cfg.stage2.init_from = "none"
    elif recipe == "no_stage2":  # stage III upcycles the model of stage I
        cfg.stages = "stage1,stage3"
        cfg.stage3.init_from = "stage1"


def ablation_config(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """The run config of one sweep point (`arg` as in the module docstring; `defaults` replace
    some of DEFAULTS for one file)."""
    args = parse_arg(arg, scale="demo", steps=1.0, **{**DEFAULTS, **defaults})
    if args.scale not in SCALES:
        raise ConfigError(f"scale={args.scale!r} is not one of {SCALES}")
    if args.num_experts < 1:
        raise ConfigError(f"num_experts={args.num_experts} must be >= 1 (1 = dense)")
    if args.scale == "demo":
        cfg = demo.get_config(f"steps={args.steps}")
        # The recorded sweeps (benchmarks/ablations/) ran stage III for 1200 steps, the demo's
        # recipe before it moved to 1600 (configs/demo.py); they stay reproducible.
        cfg.stage3.num_steps = max(1, round(ABLATION_STAGE3_STEPS * args.steps))
    else:
        cfg = pod_config()
        for name in cfg.stages.split(","):
            cfg[name].num_steps = max(1, round(cfg[name].num_steps * args.steps))
    dense = args.num_experts == 1
    cfg.model.moe.update(
        num_experts=args.num_experts, top_k=1 if dense else args.top_k, dispatch=args.dispatch,
        combine_weights="auto" if dense else args.combine_weights,
    )
    cfg.model.decoder.moe_layers = "none" if dense else args.moe_layers
    apply_recipe(cfg, args.recipe)
    return cfg
