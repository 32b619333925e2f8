"""The MoE-LLaVA presets have the released base models' sizes: their dense decoders hold exactly
the parameter counts of stabilityai/stablelm-2-1_6b, Qwen/Qwen-1_8B and microsoft/phi-2 (the
counts of the published checkpoints), and 4 experts top-2 in layers 0, 2, 4, ..."""

import math

import pytest

from moe_lvlm import presets
from moe_lvlm.config import moe_layer_indices, validate_model
from moe_lvlm.interop.hf_import import param_shapes
from moe_lvlm.train.stages import dense_variant


@pytest.mark.parametrize(
    "name, count",
    [
        ("moe_llava_stablelm_1p6bx4", 1_644_515_328),
        ("moe_llava_qwen_1p8bx4", 1_836_828_672),
        ("moe_llava_phi2_2p7bx4", 2_779_683_840),
    ],
)
def test_moe_llava_presets(name, count):
    cfg = presets.get(name)
    validate_model(cfg)
    shapes = param_shapes(dense_variant(cfg), images=False)
    assert sum(math.prod(s) for k, s in shapes.items() if k.startswith("decoder/")) == count
    d = cfg.decoder
    assert moe_layer_indices(d.moe_layers, d.num_layers) == tuple(range(0, d.num_layers, 2))
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.balance_loss_coef) == (4, 2, 0.01)
    v = cfg.vision
    assert (v.image_size, v.patch_size, v.width, v.depth, v.select_layer) == (336, 14, 1024, 24, -2)
