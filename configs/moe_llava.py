"""MoE-LLaVA's own runs: StableLM-2-1.6B, Qwen-1.8B or Phi-2-2.7B with 4 experts, top-2.

    python -m moe_lvlm.train --config=configs/moe_llava.py:model=stablelm --workdir=W \
        --config.init.llm=... --config.init.vision=... --config.data.mixture=...

Arguments: `model` = stablelm | qwen | phi2 (moe_lvlm/presets.py `moe_llava_*`). Stages as
configs/stages.py:moe_llava (MoE-LLaVA's scripts/v1/*: batch 256/128/128, lr 1e-3/2e-5/2e-5, one
epoch each, 2048-token rows); chat template 'vicuna_v1' (MoE-LLaVA's conv_stablelm / conv_phi /
conv_qwen: USER/ASSISTANT turns, each answer closed by the tokenizer's eos, and their system
prompt, which says "user" where LLaVA-v1's says "human"). Also the `--config`
of `python -m moe_lvlm.import_checkpoint` (docs/interop.md).
"""

from configs import base, stages
from moe_lvlm import presets
from moe_lvlm.config import parse_arg

# MoE-LLaVA's conv_stablelm / conv_phi system prompt (its "qwen" is conv_phi): conversation.py.
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
MODELS = {
    "stablelm": presets.moe_llava_stablelm_1p6bx4,
    "qwen": presets.moe_llava_qwen_1p8bx4,
    "phi2": presets.moe_llava_phi2_2p7bx4,
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, model="stablelm")
    if args.model not in MODELS:
        raise ValueError(f"model={args.model!r}: use one of {sorted(MODELS)}")
    cfg = base.get_base_config()
    cfg.model = MODELS[args.model]()
    cfg.data.update(template="vicuna_v1", seq_len=2048, aspect="pad")
    cfg.data.system_prompt = SYSTEM
    cfg.update(stages.moe_llava())
    cfg.stages = "stage1,stage2,stage3"
    return cfg
