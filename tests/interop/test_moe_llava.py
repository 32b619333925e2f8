"""Import of tiny MoE-LLaVA checkpoints (StableLM-2, Phi-2, Qwen-1 backbones, DeepSpeed-MoE keys):
the JAX model's logits equal the PyTorch model's (MoE layers in DeepSpeed's eval forward)."""

import jax.numpy as jnp
import numpy as np
import pytest

from moe_lvlm.config import moe_layer_indices
from moe_lvlm.interop import moe_llava
from moe_lvlm.models.lvlm import build_model
from tests.interop import moe_llava_fixtures as fx
from tests.interop.hf_helpers import TOL, jit_apply, max_err


def _inputs(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(8, 64, (2, 12))
    ids[:, 2:6] = fx.IMAGE_TOKEN_ID  # 16px images, 8px patches: 4 image tokens
    pixels = rng.randn(2, 3, 16, 16).astype(np.float32)
    return ids, pixels


@pytest.mark.parametrize("backbone", ["stablelm", "phi", "qwen"])
def test_moe_llava_logits_match(tmp_path, backbone):
    model = fx.build(backbone)
    fx.save(model, backbone, tmp_path / "ckpt")
    ids, pixels = _inputs()
    want = fx.forward(model, ids, pixels)
    model_cfg, params, _ = moe_llava.import_moe_llava(tmp_path / "ckpt", tmp_path / "ckpt/clip")
    d = model_cfg.decoder
    assert model_cfg.moe.num_experts == fx.NUM_EXPERTS
    assert moe_layer_indices(d.moe_layers, d.num_layers) == (0,)
    model_cfg.image_token_id = fx.IMAGE_TOKEN_ID
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    images = jnp.asarray(pixels.transpose(0, 2, 3, 1))[:, None]
    logits, _ = jit_apply(build_model(model_cfg), params, ids, pos, jnp.ones_like(ids), images)
    assert max_err(logits, want) <= TOL


def test_unknown_tower_is_named(tmp_path):
    model = fx.build("stablelm")
    fx.save(model, "stablelm", tmp_path / "ckpt")
    cfg = tmp_path / "ckpt/config.json"
    cfg.write_text(cfg.read_text().replace("openai/clip-vit-large-patch14-336", "my/tower"))
    with pytest.raises(ValueError, match="my/tower.*--vision_config"):
        moe_llava.import_moe_llava(tmp_path / "ckpt")
