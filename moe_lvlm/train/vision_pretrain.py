"""Supervised pre-training of a fresh vision tower on the built-in scenes.

The CPU demo's stand-in for the pretrained CLIP that MoE-LLaVA starts from (and that the demo
cannot download): before stage I, the ViT learns to tell at every patch which digit (or none)
and which colour fill the scene cell under the patch's centre, and which cell that is (CLIP's
patch features say where a patch lies too; no digit or colour target needs the tower to keep
that, and "Where is the 3?" does). The scenes are drawn as the built-in dataset draws them, from
its train digit pool only, so the held-out split's digits stay unseen. Linear heads on the
selected layer's patch features train with the tower and are then dropped; the tower's
parameters start the first stage as pretrained ones do (`init.vision`).
"""

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from PIL import Image

from moe_lvlm.data import builtin, image
from moe_lvlm.models.vit import VisionEncoder

EMPTY_DIGIT = 10  # digit label of a patch over an empty cell
EMPTY_COLOR = len(builtin.COLORS)
_GRID = builtin.CANVAS // builtin.CELL


def patch_cells(image_size: int, patch_size: int) -> np.ndarray:
    """[patches] index of the scene cell under each patch's centre (row-major patches)."""
    side = image_size // patch_size
    centre = (np.arange(side) + 0.5) * patch_size * builtin.CANVAS / image_size
    cell = (centre // builtin.CELL).astype(np.int32)
    return (cell[:, None] * _GRID + cell[None, :]).reshape(-1)


def scene_labels(objs: list[dict], cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(digit, colour) label of every patch, given the cell under each patch."""
    digit = np.full(_GRID * _GRID, EMPTY_DIGIT, np.int32)
    color = np.full(_GRID * _GRID, EMPTY_COLOR, np.int32)
    for o in objs:
        digit[o["cell"]] = o["digit"]
        color[o["cell"]] = list(builtin.COLORS).index(o["color"])
    return digit[cells], color[cells]


class SceneBatches:
    """Batches of (images [B, H, W, 3] preprocessed as in training, digit and colour labels
    [B, patches]) of scenes drawn from one digit pool ('train' or 'held_out')."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, aspect: str, pool: str, seed: int):
        masks, labels, train, held_out = builtin.digit_pools()
        indices = train if pool == "train" else held_out
        self.masks = masks
        self.by_digit = [indices[labels[indices] == d] for d in range(10)]
        self.vision, self.aspect = model_cfg.vision, aspect
        self.cells = patch_cells(self.vision.image_size, self.vision.patch_size)
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images, digits, colors = [], [], []
        for _ in range(batch_size):
            objs = builtin.sample_scene(self.rng, self.by_digit)
            pixels = Image.fromarray(builtin.render(objs, self.masks, self.rng))
            images.append(image.preprocess(pixels, self.vision.image_size, self.vision.mean,
                                           self.vision.std, self.aspect))
            digit, color = scene_labels(objs, self.cells)
            digits.append(digit)
            colors.append(color)
        return np.stack(images), np.stack(digits), np.stack(colors)


class _TowerWithHeads(nn.Module):
    """The model's vision tower (named 'vision', as in the full model) + per-patch linear heads
    for digit, colour and cell."""

    config: Any  # FrozenConfigDict of the model section

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        features, _ = VisionEncoder(self.config, train=True, name="vision")(images)
        digit = nn.Dense(EMPTY_DIGIT + 1, name="digit_head")(features)
        color = nn.Dense(EMPTY_COLOR + 1, name="color_head")(features)
        cell = nn.Dense(_GRID * _GRID, name="cell_head")(features)
        return digit, color, cell


def _loss(params, model, images, digits, colors, cells):
    digit_logits, color_logits, cell_logits = model.apply({"params": params}, images)
    ce = optax.softmax_cross_entropy_with_integer_labels
    cells = jnp.broadcast_to(cells, digits.shape)
    loss = (ce(digit_logits, digits).mean() + ce(color_logits, colors).mean()
            + ce(cell_logits, cells).mean())
    return loss, (digit_logits.argmax(-1), color_logits.argmax(-1), cell_logits.argmax(-1))


def pretrain(
    model_cfg: ml_collections.ConfigDict, settings: ml_collections.ConfigDict, aspect: str
) -> tuple[dict, dict[str, float]]:
    """Trains the tower `settings.steps` AdamW steps (batch `settings.batch_size`, warmup +
    cosine to `settings.lr`) from a seeded init. Returns ({'vision': tower params as numpy},
    held-out per-patch accuracies {'digit_accuracy', 'color_accuracy', 'cell_accuracy'} in %, over
    `settings.eval_scenes` scenes)."""
    if model_cfg.vision.get("moe_layers", "none") != "none":
        raise ValueError("vision_pretrain trains a dense tower; set model.vision.moe_layers='none'"
                         " (upcycling makes experts of the pretrained MLPs)")
    model = _TowerWithHeads(ml_collections.FrozenConfigDict(model_cfg))
    train_data = SceneBatches(model_cfg, aspect, "train", settings.seed)
    size = model_cfg.vision.image_size
    params = model.init(jax.random.PRNGKey(settings.seed), jnp.zeros((1, size, size, 3)))
    params = nn.meta.unbox(params)["params"]
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.lr, max(1, settings.steps // 20), settings.steps)
    optimizer = optax.adamw(schedule, weight_decay=0.0)
    opt_state = optimizer.init(params)

    cells = jnp.asarray(train_data.cells)

    @jax.jit
    def step(params, opt_state, images, digits, colors):
        grads, _ = jax.grad(_loss, has_aux=True)(params, model, images, digits, colors, cells)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(settings.steps):
        params, opt_state = step(params, opt_state, *train_data(settings.batch_size))
    held_out = SceneBatches(model_cfg, aspect, "held_out", settings.seed + 1)
    images, digits, colors = held_out(settings.eval_scenes)
    _, (digit_pred, color_pred, cell_pred) = jax.jit(_loss, static_argnums=1)(
        params, model, images, digits, colors, cells)
    # Accuracy over the patches that lie on a digit (empty patches are the easy majority).
    on_digit = digits != EMPTY_DIGIT
    accuracy = {
        "digit_accuracy": 100.0 * float(np.mean(np.asarray(digit_pred)[on_digit]
                                                 == digits[on_digit])),
        "color_accuracy": 100.0 * float(np.mean(np.asarray(color_pred)[on_digit]
                                                 == colors[on_digit])),
        "cell_accuracy": 100.0 * float(np.mean(np.asarray(cell_pred) == train_data.cells)),
    }
    return {"vision": jax.tree.map(np.asarray, params["vision"])}, accuracy


def pretrained_tower(cfg: ml_collections.ConfigDict) -> tuple[dict, dict[str, float]]:
    """`pretrain` as the run config `cfg` asks (`cfg.vision_pretrain`); an error with
    `init.vision` set, which names another source for the same tower."""
    if cfg.get("init") and cfg.init.get("vision"):
        raise ValueError(f"vision_pretrain.steps={cfg.vision_pretrain.steps} and "
                         f"init.vision={cfg.init.vision} both start the vision tower; keep one")
    return pretrain(cfg.model, cfg.vision_pretrain, cfg.data.aspect)


TOWER_FILE, REPORT_FILE = "vision_pretrain.npz", "vision_pretrain.json"


def _recipe(cfg: ml_collections.ConfigDict) -> dict:
    """Everything the pre-trained tower depends on."""
    return {"settings": cfg.vision_pretrain.to_dict(), "vision": cfg.model.vision.to_dict(),
            "aspect": cfg.data.aspect}


def workdir_tower(cfg: ml_collections.ConfigDict, workdir: Path, write: bool) -> dict:
    """The tower `pretrained_tower` makes for `cfg`, kept in the workdir: read back when the
    workdir holds one made with the same settings, else trained (and, with `write`, saved as
    `vision_pretrain.npz` with its accuracies in `vision_pretrain.json`)."""
    tower_path, report_path = workdir / TOWER_FILE, workdir / REPORT_FILE
    recipe = json.loads(json.dumps(_recipe(cfg)))  # as it reads back from JSON
    if tower_path.exists() and report_path.exists():
        if json.loads(report_path.read_text()).get("recipe") == recipe:
            with np.load(tower_path) as saved:
                return traverse_util.unflatten_dict(dict(saved), sep="/")
    tower, accuracy = pretrained_tower(cfg)
    print(f"vision pretraining ({cfg.vision_pretrain.steps} steps), held-out patches: "
          f"digit {accuracy['digit_accuracy']:.1f}%, colour {accuracy['color_accuracy']:.1f}%, "
          f"cell {accuracy['cell_accuracy']:.1f}%",
          flush=True)
    if write:
        flat = traverse_util.flatten_dict(tower, sep="/")
        with open(tower_path, "wb") as f:
            np.savez(f, **flat)
        report_path.write_text(json.dumps({**accuracy, "recipe": recipe}, indent=2) + "\n")
    return tower
