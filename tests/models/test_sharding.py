"""Whole model on 8 fake CPU devices: loss and gradients on data, expert and fsdp+expert+tensor
meshes equal one device's in both dispatch modes; the expert-parallel paths (capacity, and
dropless with tokens sent to their experts) really use all-to-all, never gather expert weights,
and the expert kernels are split over the 'expert' axis.

The check runs in a subprocess (sharding_check.py) because the device count must be fixed before
jax is imported.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Local shard of the decoder's expert kernel gate [E=4, d=128, f=256] on each mesh.
SHARD_SHAPES = {
    "data8": [4, 128, 256],
    "data2_expert4": [1, 128, 256],
    "fsdp2_expert2_tensor2": [2, 64, 128],
}
# What all-gathering every expert's weights produces (decoder gate/up/down; projector fc1/fc2 and
# biases): seen in dropless `all_gather` mode, never in the token-moving modes.
FULL_EXPERT_SHAPES = {
    "f32[4,128,256]", "f32[4,256,128]", "f32[4,64,128]", "f32[4,128,128]", "f32[4,128]"
}
MODES = ("capacity", "dropless", "dropless:all_gather", "dropless:ragged_a2a")


def test_sharded_loss_and_gradients_equal_single_device():
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharding_check.py"), *MODES, "batch_shard"],
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
        for mesh, shard_shape in SHARD_SHAPES.items():
            # Ratios are max |sharded - single| / (1e-5 + 1e-4 |single|) over every leaf.
            assert r[mesh]["loss_ratio"] <= 1, (dispatch, mesh, r[mesh])
            assert r[mesh]["grad_ratio"] <= 1, (dispatch, mesh, r[mesh])
            assert r[mesh]["expert_kernel_sharding"] == "P('expert', 'fsdp', 'tensor')"
            assert r[mesh]["expert_kernel_shard_shape"] == shard_shape, (dispatch, mesh)
            # The activations' logical constraints reach the program (none under `with mesh:`).
            assert r[mesh]["sharding_constraints"] >= 10, (dispatch, mesh, r[mesh])
    # Capacity mode drops tokens here (factor 1.0, skewed routers): sharding must not change which.
    assert max(result["capacity"]["dropped_fraction"]) > 0
    assert result["dropless"]["dropped_fraction"] == [0.0] * 2
    # Capacity: expert parallelism moves the dispatched slots with all-to-all; data parallel does
    # not. Dropless (CPU default: buffered all-to-all): the (token, choice) pairs travel to their
    # experts' devices; no all-gather at all on (data 2, expert 4), and on fsdp+expert+tensor
    # only the ZeRO-3 gathers of each device's own experts, never all E.
    assert result["capacity"]["data2_expert4"]["all_to_all"]
    assert result["capacity"]["fsdp2_expert2_tensor2"]["all_to_all"]
    assert not result["capacity"]["data8"]["all_to_all"]
    assert not result["dropless"]["data8"]["all_to_all"]
    assert result["dropless"]["data2_expert4"]["all_to_all"]
    assert result["dropless"]["data2_expert4"]["all_gather_shapes"] == []
    mixed = result["dropless"]["fsdp2_expert2_tensor2"]
    assert mixed["all_to_all"] and not FULL_EXPERT_SHAPES & set(mixed["all_gather_shapes"])
    # ep_dispatch='all_gather': tokens stay, every expert's weights are gathered (same numbers).
    gathered = result["dropless:all_gather"]["data2_expert4"]
    assert gathered["loss_ratio"] <= 1 and gathered["grad_ratio"] <= 1, gathered
    assert not gathered["all_to_all"]
    assert FULL_EXPERT_SHAPES <= set(gathered["all_gather_shapes"])
    # ragged_a2a (GPU/TPU) lowers to ragged-all-to-all: per MoE layer (decoder 0, projector) one
    # there and one back, each transposed in the backward pass; no all-gather.
    ragged = result["dropless:ragged_a2a"]["data2_expert4"]
    assert ragged["ragged_all_to_all"] == 8, ragged
    assert not ragged["all_gather"]
    # capacity_group='batch_shard': one routing group per batch shard, as DeepSpeed gates each
    # device's tokens; the sharded layer equals one device's run on each shard alone.
    for mesh, r in result["batch_shard"].items():
        assert r["ratio"] <= 1, (mesh, r)
        assert max(r["dropped_fraction"]) > 0, mesh
