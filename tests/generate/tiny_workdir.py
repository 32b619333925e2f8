"""A tiny model and a workdir holding it, for the generation and evaluation tests.

The workdir looks like one `python -m moe_lvlm.train --config=configs/demo.py` leaves (config.json,
a stage3 orbax checkpoint) but holds a shrunk demo model with random parameters, a SentencePiece
tokenizer trained here (no built-in dataset needed). Its embedding is scaled up so that the
output depends on the tokens (at init, every position of the random model predicts the same
token) and its lm_head so that greedy decoding meets no near-ties.
"""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from configs import demo
from moe_lvlm.config import num_image_tokens
from moe_lvlm.data.tokenizer import Tokenizer, train_tokenizer
from moe_lvlm.models.lvlm import build_model
from moe_lvlm.train import stages as stages_lib
from moe_lvlm.train.checkpoint import StageCheckpoints
from moe_lvlm.train.loop import stage_names

TEXTS = [
    "How many digits are in the image? Answer with a single word or phrase.",
    "What color is the 3? Which digit is at the top left? Where is the 7?",
    "Is there a 5 in the image? yes no red green blue top left bottom right",
    "USER: ASSISTANT: A chat between a curious human and an assistant.",
] * 10 + [f"item {i} is {i % 3}" for i in range(50)]
EMBEDDING_SCALE = 50.0
LM_HEAD_SCALE = 30.0


def tiny_tokenizer() -> Tokenizer:
    return train_tokenizer(TEXTS, vocab_size=200, byte_fallback=False)


def tiny_model_config(dispatch: str = "dropless") -> ml_collections.ConfigDict:
    """The demo model cut to a 2-block decoder (block 0 MoE) and a 2-block ViT."""
    cfg = demo.get_config(f"dispatch={dispatch}").model
    cfg.decoder.update(vocab_size=256, num_layers=2)
    cfg.vision.depth = 2
    return cfg


def init_params(model_cfg: ml_collections.ConfigDict, seed: int = 0):
    """The model and random parameters, embedding and lm_head scaled up (module docstring)."""
    model = build_model(model_cfg)
    size = model_cfg.vision.image_size
    ids = jnp.zeros((1, 8), jnp.int32)
    images = jnp.zeros((1, 1, size, size, 3), jnp.float32)
    init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, ids, ids, jnp.ones_like(ids), images)))
    params = init(jax.random.PRNGKey(seed))["params"]
    params["decoder"]["embedding"] = params["decoder"]["embedding"] * EMBEDDING_SCALE
    params["decoder"]["lm_head"] = params["decoder"]["lm_head"] * LM_HEAD_SCALE
    return model, params


def make_workdir(root: Path, template: str = "vicuna_v1") -> Path:
    """Writes a workdir with config.json and a stage3 checkpoint (step 7) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    tokenizer.save(str(root / "tokenizer.model"))
    cfg = demo.get_config()
    cfg.model = tiny_model_config()
    cfg.data.update(tokenizer=str(root / "tokenizer.model"), data_dir=str(root / "tfds"),
                    template=template)
    cfg.checkpoint.async_save = False
    workdir = root / "workdir"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    names = stage_names(cfg)
    model_cfg = stages_lib.stage_model_config(cfg, names, names.index("stage3"))
    model_cfg.image_token_id = tokenizer.image_token_id
    assert num_image_tokens(model_cfg) == 16
    _, params = init_params(model_cfg)
    ckpt = StageCheckpoints(workdir / "stage3" / "checkpoints", max_to_keep=1, async_save=False)
    ckpt.save(7, {"params": params}, None, cfg)
    ckpt.manager.close()
    return workdir
