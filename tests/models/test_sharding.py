"""Whole model on 8 fake CPU devices: loss and gradients on data, expert and fsdp+expert+tensor
meshes equal one device's, and the expert-parallel capacity path really uses all-to-all.

The check runs in a subprocess (sharding_check.py) because the device count must be fixed before
jax is imported.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MESHES = ("data8", "data2_expert4", "fsdp2_expert2_tensor2")


def test_sharded_loss_and_gradients_equal_single_device():
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharding_check.py"), "capacity", "dropless"],
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    for dispatch in ("capacity", "dropless"):
        r = result[dispatch]
        for mesh in MESHES:
            # Ratios are max |sharded - single| / (1e-5 + 1e-4 |single|) over every leaf.
            assert r[mesh]["loss_ratio"] <= 1, (dispatch, mesh, r[mesh])
            assert r[mesh]["grad_ratio"] <= 1, (dispatch, mesh, r[mesh])
            assert r[mesh]["expert_kernel_sharding"] == "P('expert', 'fsdp', 'tensor')"
    # Capacity mode drops tokens here (factor 1.0, skewed routers): sharding must not change which.
    assert max(result["capacity"]["dropped_fraction"]) > 0
    assert result["dropless"]["dropped_fraction"] == [0.0] * 3
    # Expert parallelism moves the dispatched slots with all-to-all; pure data parallel does not.
    assert result["capacity"]["data2_expert4"]["all_to_all"]
    assert result["capacity"]["fsdp2_expert2_tensor2"]["all_to_all"]
    assert not result["capacity"]["data8"]["all_to_all"]
