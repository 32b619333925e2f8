"""The native attention kernel under an 8-device mesh (run by test_attention.py in a subprocess:
the device count must be fixed before jax is imported).

Batch over (data 2, fsdp 2), heads over tensor 2: output and gradients under jit with sharded
inputs must equal the numpy reference, with RoPE inside the kernel too (positions sharded like the
segment ids), and the compiled program must hold no collective (each device runs the kernel on its
own rows and heads). With qk-norm in the kernel as well, output and gradients (the replicated
scales' summed over the devices) equal the same call on one device. Prints `RESULT {json}`.
"""

import functools
import json
import os
import sys

os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"
]).strip()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from test_attention import (  # noqa: E402
    allowed_keys,
    np_attention,
    np_rope,
    packed_positions,
    random_case,
)

from moe_lvlm.kernels.native_attention import native_attention  # noqa: E402
from moe_lvlm.models.layers import rope_frequencies  # noqa: E402
from moe_lvlm.parallel.mesh import BATCH_AXES, make_mesh  # noqa: E402


def main():
    mesh = make_mesh((2, 2, 1, 2))
    q, k, v, dout, segments = random_case(70, True, b=4)
    heads = NamedSharding(mesh, P(BATCH_AXES, None, "tensor"))
    rows = NamedSharding(mesh, P(BATCH_AXES))
    args = [jax.device_put(x, heads) for x in (q, k, v, dout)] + [jax.device_put(segments, rows)]

    def run(q_, k_, v_, do_, seg, rope):
        out, vjp = jax.vjp(
            lambda a, b, c: native_attention(a, b, c, seg, causal=True, mesh=mesh, rope=rope),
            q_, k_, v_)
        return out, vjp(do_)

    step = jax.jit(run)
    allowed = allowed_keys(segments, 70, True)
    errors, collectives = [], set()
    positions = packed_positions(segments, 70, 4)
    for rope in (None, (jax.device_put(positions, rows), rope_frequencies(8, 10000.0))):
        out, grads = step(*args, rope)
        hlo = step.lower(*args, rope).compile().as_text()
        if rope is None:
            want_out, want_grads = np_attention(q, k, v, dout, allowed)
        else:
            qr, kr = (np_rope(x.astype(np.float64), positions, 10000.0, 8) for x in (q, k))
            want_out, (dq, dk, dv) = np_attention(qr, kr, v.astype(np.float64), dout, allowed)
            want_grads = (np_rope(dq, positions, 10000.0, 8, inverse=True),
                          np_rope(dk, positions, 10000.0, 8, inverse=True), dv)
        errors += [float(np.max(np.abs(np.asarray(g) - w) / (5e-5 + 1e-4 * np.abs(w))))
                   for g, w in zip((out, *grads), (want_out, *want_grads), strict=True)]
        collectives |= {op for op in ("all-gather", "all-reduce", "all-to-all",
                                      "collective-permute") if op in hlo}
    # qk-norm too: the scales are replicated, their gradients summed over the devices' rows;
    # against the same call on one device (test_attention.py checks that one).
    scales = [np.linspace(a, b, 8, dtype=np.float32) for a, b in ((0.5, 1.5), (1.2, 0.8))]
    rope = (positions, rope_frequencies(8, 10000.0))

    def normed(q_, k_, v_, qs, ks, do_, seg, rope_, mesh_):
        out, vjp = jax.vjp(lambda *a: native_attention(*a[:3], seg, causal=True, mesh=mesh_,
                                                        rope=rope_, qk_norm=(*a[3:], 1e-6)),
                           q_, k_, v_, qs, ks)
        return out, vjp(do_)

    sharded = jax.jit(functools.partial(normed, mesh_=mesh))
    got = sharded(*args[:3], *scales, args[3], args[4], (jax.device_put(positions, rows), rope[1]))
    want = jax.jit(functools.partial(normed, mesh_=None))(q, k, v, *scales, dout, segments, rope)
    errors += [float(np.max(np.abs(np.asarray(g) - w) / (5e-5 + 1e-4 * np.abs(w))))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)]
    collectives = sorted(collectives)
    print("RESULT " + json.dumps({"worst_ratio": max(errors), "collectives": collectives,
                                  "out_sharding": str(out.sharding.spec)}))


if __name__ == "__main__":
    main()
