"""The native RMSNorm under an 8-device mesh (run by test_native_norm.py in a subprocess: the
device count must be fixed before jax is imported).

Batch over (data 2, fsdp 2) with tensor 2: the output and the (scale, x) gradients under jit
with sharded inputs must equal the same layer without a mesh, the kernel must run (custom calls
in the compiled program), and the program must gather no activation (each device normalises its
own rows; the scale's gradient is all-reduced). Prints `RESULT {json}`.
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

from moe_lvlm.models.layers import RMSNorm  # noqa: E402
from moe_lvlm.parallel.mesh import BATCH_AXES, make_mesh  # noqa: E402


def main():
    mesh = make_mesh((2, 2, 1, 2))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 10, 24)).astype(np.float32)
    cot = rng.normal(size=x.shape).astype(np.float32)
    params = {"params": {"scale": rng.normal(size=24).astype(np.float32)}}

    def grads(layer, x_):
        def loss(p, xx):
            y = layer.apply(p, xx)
            return jnp.sum(y * cot), y
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x_)

    want = jax.jit(lambda x_: grads(RMSNorm(implementation="native"), x_))(x)
    step = jax.jit(lambda x_: grads(RMSNorm(implementation="native", mesh=mesh), x_))
    xs = jax.device_put(x, NamedSharding(mesh, P(BATCH_AXES)))
    got = step(xs)
    hlo = step.lower(xs).compile().as_text()
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    collectives = sorted({op for op in ("all-gather", "all-reduce", "all-to-all",
                                         "collective-permute") if op in hlo})
    print("RESULT " + json.dumps({"worst": worst, "collectives": collectives,
                                  "calls": hlo.count("moe_lvlm_rms_norm")}))


if __name__ == "__main__":
    main()
