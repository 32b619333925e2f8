"""Vision pre-training on the built-in scenes: patch labels read from the rendered pixels, the
train/held-out digit pools kept apart, a tower that learns colours and digits, and a training
run whose stage I starts from the pre-trained tower."""

import json

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import demo
from moe_lvlm.data import builtin
from moe_lvlm.train import vision_pretrain
from tests.train.conftest import checkpoint_steps, restore_state


def settings(steps: int, eval_scenes: int = 200) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(steps=steps, batch_size=64, lr=1e-3, seed=0, eval_scenes=eval_scenes))


@pytest.mark.parametrize("image_size, patch_size, want", [
    (32, 8, [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]),
    (32, 16, [0, 1, 2, 3]),
    (64, 16, [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]),
])
def test_patch_cells(image_size, patch_size, want):
    assert vision_pretrain.patch_cells(image_size, patch_size).tolist() == want


def test_labels_describe_the_rendered_cells():
    cfg = demo.get_config().model
    cfg.vision.update(image_size=64, patch_size=32)  # one patch per cell, no resize
    images, digits, colors = vision_pretrain.SceneBatches(cfg, "pad", "train", seed=3)(40)
    pixels = images * np.asarray(cfg.vision.std) + np.asarray(cfg.vision.mean)  # back to [0, 1]
    palette = np.asarray(list(builtin.COLORS.values()), np.float32) / 255
    for img, digit, color in zip(pixels, digits, colors, strict=True):
        for cell in range(4):
            y, x = divmod(cell, 2)
            region = img[32 * y:32 * y + 32, 32 * x:32 * x + 32].reshape(-1, 3)
            occupied = region.max() > 0.2
            assert occupied == (digit[cell] != vision_pretrain.EMPTY_DIGIT)
            assert occupied == (color[cell] != vision_pretrain.EMPTY_COLOR)
            if occupied:  # the brightest pixel is the digit's colour at full stroke strength
                brightest = region[region.sum(1).argmax()]
                nearest = np.abs(palette - brightest).sum(1).argmin()
                assert nearest == color[cell]


def test_scenes_of_each_pool_use_only_its_digit_images():
    _, labels, train, held_out = builtin.digit_pools()
    cfg = demo.get_config().model
    for pool, indices in (("train", train), ("held_out", held_out)):
        by_digit = vision_pretrain.SceneBatches(cfg, "pad", pool, seed=0).by_digit
        assert sorted(np.concatenate(by_digit).tolist()) == sorted(indices.tolist())
        assert all((labels[ids] == d).all() for d, ids in enumerate(by_digit))
    assert not set(train) & set(held_out)


def test_the_tower_learns_colours_digits_and_cells_of_held_out_scenes():
    cfg = demo.get_config().model
    tower, accuracy = vision_pretrain.pretrain(cfg, settings(150), "pad")
    # Chance: 1 in 5 colours, 1 in 10 digits (patches that lie on a digit), 1 in 4 cells.
    assert accuracy["color_accuracy"] > 90
    assert accuracy["digit_accuracy"] > 25
    assert accuracy["cell_accuracy"] > 50
    assert set(tower) == {"vision"}


def test_a_moe_tower_is_refused():
    cfg = demo.get_config().model
    cfg.vision.moe_layers = "all"
    with pytest.raises(ValueError, match="moe_layers"):
        vision_pretrain.pretrain(cfg, settings(1), "pad")


def test_init_vision_and_vision_pretrain_together_are_refused():
    cfg = demo.get_config()
    cfg.init.vision = "/some/clip"
    with pytest.raises(ValueError, match="init.vision=/some/clip"):
        vision_pretrain.pretrained_tower(cfg)


def test_the_workdir_keeps_the_tower_and_reuses_it(tmp_path, monkeypatch):
    cfg = demo.get_config()
    cfg.vision_pretrain.update(steps=2, eval_scenes=20)
    first = vision_pretrain.workdir_tower(cfg, tmp_path, write=True)
    report = json.loads((tmp_path / vision_pretrain.REPORT_FILE).read_text())
    assert {"digit_accuracy", "color_accuracy", "cell_accuracy"} <= set(report)

    def no_training(_):
        raise AssertionError("trained again")

    monkeypatch.setattr(vision_pretrain, "pretrained_tower", no_training)
    again = vision_pretrain.workdir_tower(cfg, tmp_path, write=True)
    jax.tree.map(np.testing.assert_array_equal, again, first)
    cfg.vision_pretrain.lr = 5e-4  # another recipe: trained anew
    with pytest.raises(AssertionError, match="trained again"):
        vision_pretrain.workdir_tower(cfg, tmp_path, write=True)


def test_stage1_starts_from_the_pretrained_tower(reference_run):
    """The reference run pre-trains the tower (a few steps) and keeps it in its workdir; stage I
    keeps the tower frozen, so its final checkpoint holds exactly that tower."""
    with np.load(reference_run / vision_pretrain.TOWER_FILE) as saved:
        want = {k.removeprefix("vision/"): v for k, v in saved.items()}
    checkpoints = reference_run / "stage1" / "checkpoints"
    got = restore_state(checkpoints, checkpoint_steps(checkpoints)[-1])["params"]["vision"]
    got = traverse_util.flatten_dict(got, sep="/")
    assert set(got) == set(want)
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
