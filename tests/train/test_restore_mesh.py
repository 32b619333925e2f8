"""A checkpoint saved on one device restores onto an 8-device mesh (fsdp, expert and tensor
axes of 2) with the same parameters, now sharded."""

import json
import subprocess
import sys

import numpy as np

from moe_lvlm.train.stages import flatten
from tests.train.conftest import ROOT, STEPS, restore_state, train_env


def test_restore_on_an_8_device_mesh(tmp_path, compile_cache, reference_run):
    out = tmp_path / "restored"
    env = {**train_env(compile_cache, "--xla_force_host_platform_device_count=8"),
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "tests/train/restore_on_mesh.py", str(reference_run), "stage3", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["devices"] == 8 and info["step"] == STEPS
    got = {k.replace("|", "/"): v for k, v in np.load(out.with_suffix(".npz")).items()}
    want = flatten(restore_state(reference_run / "stage3" / "checkpoints", STEPS)["params"])
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # Experts [E, embed, mlp] over (expert, fsdp, tensor); the embedding [vocab, embed] over
    # (tensor, fsdp).
    experts = "decoder/layers_0/moe/experts/gate"
    assert info["shards"][experts] == [s // 2 for s in want[experts].shape]
    assert info["shards"]["decoder/embedding"] == [s // 2 for s in want["decoder/embedding"].shape]
