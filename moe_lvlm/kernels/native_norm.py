"""'native' RMSNorm: the C++ kernel of norm.cc through `jax.ffi` (`model.rms_norm`).

`rms_norm(x [..., d], scale [d], eps)` is x * rsqrt(mean(x^2, -1) + eps) * scale in float32
whatever the input dtype. The forward also returns the per-row rsqrt; the custom VJP's backward
gives dx and dscale (summed over rows in a fixed order: deterministic). CPU only; the library is
built on first use (moe_lvlm/kernels/build.py). Under a mesh of more than one device the call
runs inside `jax.shard_map` over the batch axes with the scale replicated (its gradient is summed
over the shards), so XLA never partitions the custom call itself.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moe_lvlm.kernels import build
from moe_lvlm.parallel.mesh import BATCH_AXES

Array = jax.Array

RMS_NORMS = ("auto", "xla", "native")
_FORWARD = "moe_lvlm_rms_norm_forward"
_BACKWARD = "moe_lvlm_rms_norm_backward"


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA:CPU (warns once if not)."""
    return build.register("norm.cc", {_FORWARD: "MoeRmsNormForward",
                                      _BACKWARD: "MoeRmsNormBackward"})


def resolve(choice: str, mesh: Mesh | None = None) -> str:
    """`model.rms_norm` with 'auto' resolved: 'native' on one CPU device where the kernel builds,
    else 'xla' (multi-device CPU meshes, i.e. test meshes, keep XLA's norm and its sharding unless
    'native' is asked for: it then runs in `jax.shard_map`). Raises ValueError for an unknown
    choice or a 'native' that cannot run."""
    if choice not in RMS_NORMS:
        raise ValueError(f"model.rms_norm={choice!r}: use one of {RMS_NORMS}")
    if choice == "xla":
        return choice
    backend = jax.default_backend()
    if choice == "auto":
        one_device = mesh is None or mesh.size == 1
        return "native" if backend == "cpu" and one_device and available() else "xla"
    if backend != "cpu":
        raise ValueError(f"model.rms_norm='native' cannot run: the backend is {backend} (the "
                         "kernel is CPU-only); use 'auto' or 'xla'")
    if not available():
        raise ValueError("model.rms_norm='native' cannot run: the kernel is unavailable (see the "
                         "warning above); use 'auto' or 'xla'")
    return choice


def rms_norm(x: Array, scale: Array, eps: float, mesh: Mesh | None = None) -> Array:
    """x [..., d], scale [d] -> float32 [..., d]. Under `mesh` (more than one device) the
    leading axis is split over the batch axes."""
    resolve("native")  # raises where the kernel cannot run
    body = functools.partial(_rows, float(eps))
    if mesh is not None and mesh.size > 1:
        rows = P(BATCH_AXES)
        body = jax.shard_map(body, mesh=mesh, in_specs=(rows, P()), out_specs=rows,
                             check_vma=False)
    return body(x.astype(jnp.float32), scale.astype(jnp.float32))


def _rows(eps, x, scale):
    return _norm(eps, x.reshape(-1, x.shape[-1]), scale).reshape(x.shape)


def _forward(eps, x, scale):
    shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
              jax.ShapeDtypeStruct(x.shape[:1], jnp.float32))
    call = jax.ffi.ffi_call(_FORWARD, shapes, vmap_method="sequential")
    return call(x, scale, eps=np.float32(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _norm(eps, x, scale):
    return _forward(eps, x, scale)[0]


def _norm_fwd(eps, x, scale):
    y, rinv = _forward(eps, x, scale)
    return y, (x, scale, rinv)


def _norm_bwd(eps, residuals, dy):
    x, scale, rinv = residuals
    shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
              jax.ShapeDtypeStruct(scale.shape, jnp.float32))
    call = jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method="sequential")
    return call(x, scale, rinv, dy.astype(jnp.float32))


_norm.defvjp(_norm_fwd, _norm_bwd)
