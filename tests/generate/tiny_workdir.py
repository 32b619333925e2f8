"""A tiny model and a workdir holding it, for the generation and evaluation tests.

The workdir looks like one `python -m moe_lvlm.train --config=configs/demo.py` leaves (config.json,
a stage3 orbax checkpoint) but holds a shrunk demo model with random parameters, a SentencePiece
tokenizer trained here (no built-in dataset needed). Its embedding is larger than the model's
init (with N(0, 0.02) every position of a random model predicts the same token) and so is its
lm_head, so that greedy decoding meets no near-ties.
"""

import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

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
LM_HEAD_STD = 0.6


def tiny_tokenizer() -> Tokenizer:
    return train_tokenizer(TEXTS, vocab_size=200, byte_fallback=False)


def tiny_model_config(dispatch: str = "dropless") -> ml_collections.ConfigDict:
    """The demo model cut to a 2-block decoder (block 0 MoE) and a 2-block ViT."""
    cfg = demo.get_config(f"dispatch={dispatch}").model
    cfg.decoder.update(vocab_size=256, num_layers=2)
    cfg.vision.depth = 2
    return cfg


def init_params(model_cfg: ml_collections.ConfigDict, seed: int = 0):
    """The model and random parameters drawn with numpy (jit-compiling `model.init` takes tens
    of seconds on CPU): norm scales 1, biases and position embeddings N(0, 0.02), weights
    N(0, 1 / fan_in), the embedding N(0, 1) and the lm_head N(0, LM_HEAD_STD) (module docstring).
    """
    model = build_model(model_cfg)
    size = model_cfg.vision.image_size
    ids = jnp.zeros((1, 8), jnp.int32)
    images = jnp.zeros((1, 1, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda r: model.init(r, ids, ids, jnp.ones_like(ids), images),
                            jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        normal = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name in ("bias", "cls", "pos_embed"):
            return 0.02 * normal
        if name == "embedding":
            return normal
        if name == "lm_head":
            return LM_HEAD_STD * normal
        return normal / np.sqrt(np.prod(leaf.shape[:-1]))

    params = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes)["params"])
    return model, jax.tree.map(jnp.asarray, params)


@functools.partial(jax.jit, static_argnames="model")
def _last_logits(model, params, ids, n, image):
    """The full forward of one row holding n tokens (padded on the right): logits at n - 1."""
    length = ids.shape[1]
    segment_ids = (jnp.arange(length) < n).astype(jnp.int32)[None]
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    logits, _ = model.apply({"params": params}, ids, positions, segment_ids, image)
    return logits[0, n - 1]


def reference_greedy(model, params, prompt, image, steps, stop_ids, vocab_size=None, length=64):
    """Greedy decoding by recomputing the full forward over prompt + generated tokens at every
    step: no cache, no left padding (one row, padded on the right to `length`). Returns the new
    tokens up to and including the first of `stop_ids`; ids >= vocab_size are never chosen."""
    tokens = list(prompt)
    out = []
    for _ in range(steps):
        ids = np.zeros((1, length), np.int32)
        ids[0, : len(tokens)] = tokens
        logits = np.asarray(_last_logits(model, params, ids, len(tokens), image))
        token = int(np.argmax(logits[:vocab_size]))
        out.append(token)
        tokens.append(token)
        if token in stop_ids:
            break
    return out


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
    assert num_image_tokens(model_cfg) == 4  # 32x32 images, 16x16 patches
    _, params = init_params(model_cfg)
    ckpt = StageCheckpoints(workdir / "stage3" / "checkpoints", max_to_keep=1, async_save=False)
    ckpt.save(7, {"params": params}, None, cfg)
    ckpt.manager.close()
    return workdir
