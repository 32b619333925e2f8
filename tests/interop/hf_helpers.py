"""Shared helpers for the HF interop tests: tiny configs, random params, fp32 PyTorch on CPU."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import models
from moe_lvlm.interop import hf_import

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TOL = 1e-4


def tiny_model_config(**decoder) -> ml_collections.ConfigDict:
    """A CLIP-like 16px tower (3 blocks, features from block 2) and a 4-layer decoder."""
    cfg = models.tiny()
    cfg.vision.update(image_size=16, patch_size=8, width=32, depth=3, num_heads=4, mlp_dim=64)
    cfg.decoder.update(
        vocab_size=64,
        embed_dim=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=48,
        moe_layers="none",
    )
    cfg.decoder.update(decoder)
    cfg.image_token_id = 7
    return cfg


def random_params(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> dict:
    """Every parameter random (norm scales near 1), so that every bias and norm matters."""
    rng = np.random.RandomState(seed)
    flat = {}
    for path, shape in sorted(hf_import.param_shapes(model_cfg).items()):
        noise = rng.randn(*shape).astype(np.float32)
        flat[path] = 1.0 + 0.1 * noise if path.endswith("scale") else 0.2 * noise
    return traverse_util.unflatten_dict(flat, sep="/")


def randomize_torch(model, seed: int = 0) -> None:
    """Replaces HF's small init with N(0, 0.2) weights (norm weights 1 + N(0, 0.1))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def jit_apply(module, params, *args):
    return jax.jit(lambda p, *a: module.apply({"params": p}, *a))(params, *args)
