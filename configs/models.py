"""Model presets for configs: defined in moe_lvlm/presets.py (the package needs them itself)."""

from moe_lvlm.presets import (  # noqa: F401
    CLIP_MEAN,
    CLIP_STD,
    PRESETS,
    get,
    moe_defaults,
    moe_llava_1p6bx4,
    moe_llava_phi2_2p7bx4,
    moe_llava_qwen_1p8bx4,
    moe_llava_stablelm_1p6bx4,
    tiny,
)
