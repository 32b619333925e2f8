"""The CuMo preset: stage III co-upcycles the ViT MLPs and the projector with the decoder FFNs,
routes dropless with balance 0.1 and z-loss 0.01, and trains them; attention, norms and
embeddings stay as stage II left them."""

import json

import numpy as np
import pytest

from configs import cumo, stages
from moe_lvlm.train.stages import flatten, stage_model
from tests.train.conftest import REFERENCE_OVERRIDES, restore_state, run_train, train_command

DENSE_STEPS, CUMO_STEPS = 2, 3


def test_preset_fields():
    cfg = cumo.get_config()
    assert cfg.model.vision.moe_layers == "all" and cfg.model.projector.moe
    moe = cfg.model.moe
    assert (moe.dispatch, moe.balance_loss_coef, moe.z_loss_coef) == ("dropless", 0.1, 0.01)
    assert stages.VISION_FFNS in cfg.stage3.trainable
    names = cfg.stages.split(",")
    dense = stage_model(cfg, names, "stage2")
    assert dense.vision.moe_layers == "none" and not dense.projector.moe
    assert stage_model(cfg, names, "stage3") is cfg.model


@pytest.mark.slow
def test_cumo_command_runs_from_a_fresh_workdir(tmp_path, data_dir, compile_cache):
    """The docstring's command from an empty workdir: vision pre-training of the dense tower,
    stages I and II dense, stage III co-upcycled and trained, with each MoE layer's balance and
    z losses logged."""
    workdir = tmp_path / "run"
    overrides = {**REFERENCE_OVERRIDES, "stage1.num_steps": DENSE_STEPS,
                 "stage2.num_steps": DENSE_STEPS, "stage3.num_steps": CUMO_STEPS}
    out = run_train(train_command(workdir, data_dir, "", overrides, config="configs/cumo.py"),
                    compile_cache)
    assert "vision pretraining" in out and (workdir / "vision_pretrain.npz").exists()

    records = [json.loads(x) for x in
               (workdir / "stage3" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, CUMO_STEPS + 1))
    layers = {k.rsplit("/", 1)[0] for k in records[0] if k.startswith("moe/")}
    assert layers == {"moe/vision/layers_0", "moe/projector", "moe/decoder/layers_0"}
    for r in records:
        assert r["loss"] == pytest.approx(r["ce"] + 0.1 * r["balance_loss"] + 0.01 * r["z_loss"],
                                          rel=1e-6)
        assert r["z_loss"] > 0
        for name in ("balance_loss", "z_loss"):  # per layer, summing to the logged total
            per_layer = [r[f"{layer}/{name}"] for layer in layers]
            assert all(v > 0 for v in per_layer)
            assert sum(per_layer) == pytest.approx(r[name], rel=1e-5)
        assert all(r[f"{layer}/dropped_fraction"] == 0.0 for layer in layers)

    before = flatten(restore_state(workdir / "stage2" / "checkpoints", DENSE_STEPS)["params"])
    after = flatten(restore_state(workdir / "stage3" / "checkpoints", CUMO_STEPS)["params"])
    for prefix, dense in (("vision/layers_0", "fc1"), ("projector", "fc1")):
        experts = after[f"{prefix}/moe/experts/{dense}"]  # [E, in, out], upcycled then trained
        assert experts.shape[0] == 4 and f"{prefix}/mlp/{dense}/kernel" in before
        assert not np.array_equal(experts[0], before[f"{prefix}/mlp/{dense}/kernel"])
    frozen = [k for k in after if k in before and "/mlp/" not in k]  # all but dense FFNs
    assert any("attn" in k for k in frozen) and "decoder/embedding" in frozen
    for k in frozen:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
