"""The fused LM head + loss kernel under an 8-device mesh (run by test_native_lm_loss.py in a
subprocess: the device count must be fixed before jax is imported).

Tokens over (data 4, fsdp 2), head and bias replicated: the loss and its gradients (x, head,
bias) under jit with sharded inputs must equal the kernel without a mesh (the head's gradient is
the sum over the shards). Prints `RESULT {json}`.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"
]).strip()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moe_lvlm.kernels import native_lm_loss  # noqa: E402
from moe_lvlm.parallel.mesh import BATCH_AXES, make_mesh  # noqa: E402


def main():
    mesh = make_mesh((4, 2, 1, 1))
    rng = np.random.default_rng(0)
    batch, seq, d, v = 8, 13, 32, 70
    x = rng.normal(size=(batch, seq, d)).astype(np.float32)
    head = (rng.normal(size=(d, v)) * 0.3).astype(np.float32)
    bias = rng.normal(size=v).astype(np.float32)
    targets = rng.integers(0, v, (batch, seq)).astype(np.int32)
    weights = (rng.random((batch, seq)) > 0.4).astype(np.float32)

    def grads(mesh_):
        def loss(x_, h_, b_, t_, w_):
            return native_lm_loss.weighted_nll_sum(x_, h_, b_, t_, w_, mesh_)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))

    want = jax.jit(grads(None))(x, head, bias, targets, weights)
    rows = NamedSharding(mesh, P(BATCH_AXES))
    args = (jax.device_put(x, rows), head, bias, jax.device_put(targets, rows),
            jax.device_put(weights, rows))
    got = jax.jit(grads(mesh))(*args)
    calls = str(jax.make_jaxpr(grads(mesh))(*args)).count("moe_lvlm_lm_loss_forward_backward")
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    print("RESULT " + json.dumps({"worst": worst, "calls": calls}))


if __name__ == "__main__":
    main()
