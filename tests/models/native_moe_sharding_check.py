"""The native expert kernel in the MoE layer under an 8-device mesh (run by test_native_moe.py
in a subprocess: the device count must be fixed before jax is imported).

Batch over (data 2, fsdp 2, tensor 2), capacity dispatch: output and gradients under jit with
sharded inputs must equal the same layer without a mesh, and the compiled program must hold no
all-to-all (each device runs the kernel on its own rows). Also the native dense SwiGLU FFN
(`model.dense_ffn='native'`) with the batch over (data 4, fsdp 2). Prints `RESULT {json}`.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moe_lvlm.models import moe  # noqa: E402
from moe_lvlm.models.layers import DenseFeedForward  # noqa: E402
from moe_lvlm.parallel.mesh import BATCH_AXES, make_mesh  # noqa: E402
from tests.models.test_moe_reference import moe_config, random_moe_params  # noqa: E402


def main():
    mesh = make_mesh((2, 2, 1, 2))
    cfg = moe_config(dispatch="capacity", expert_compute="native", capacity_factor_train=1.0)
    batch, seq, d, hidden = 8, 10, 16, 32
    params = random_moe_params(np.random.default_rng(0), d, hidden, d, cfg.num_experts, True)
    x = np.random.default_rng(1).normal(size=(batch, seq, d)).astype(np.float32) + 1.0
    cot = np.random.default_rng(2).normal(size=(batch, seq, d)).astype(np.float32)

    def grads(layer, x_):
        def loss(p, xx):
            y = layer.apply({"params": p}, xx, train=True)[0]
            return jnp.sum(y * cot), y
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x_)

    want = jax.jit(lambda x_: grads(moe.MoeFeedForward(cfg, hidden), x_))(x)
    step = jax.jit(lambda x_: grads(moe.MoeFeedForward(cfg, hidden, mesh=mesh), x_))
    xs = jax.device_put(x, NamedSharding(mesh, P(BATCH_AXES)))
    got = step(xs)
    hlo = step.lower(xs).compile().as_text()
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    collectives = sorted({op for op in ("all-gather", "all-reduce", "all-to-all",
                                         "collective-permute") if op in hlo})
    print("RESULT " + json.dumps({"worst": worst, "collectives": collectives,
                                  "dense_worst": dense_ffn_worst(x, cot)}))


def dense_ffn_worst(x, cot):
    """The native dense SwiGLU FFN with the batch over (data 4, fsdp 2) against no mesh."""
    mesh = make_mesh((4, 2, 1, 1))

    def grads(layer, x_):
        params = layer.init(jax.random.PRNGKey(0), x_)

        def loss(p, xx):
            return jnp.sum(layer.apply(p, xx) * cot)
        return jax.grad(loss, argnums=(0, 1))(params, x_)

    want = jax.jit(lambda x_: grads(DenseFeedForward(32, implementation="native"), x_))(x)
    step = jax.jit(lambda x_: grads(
        DenseFeedForward(32, implementation="native", mesh=mesh), x_))
    got = step(jax.device_put(x, NamedSharding(mesh, P(BATCH_AXES))))
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))


if __name__ == "__main__":
    main()
