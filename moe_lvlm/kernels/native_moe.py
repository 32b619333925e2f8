"""'native' expert compute: the fused routed SwiGLU experts of moe.cc through `jax.ffi`.

`routed_swiglu(x [T, d], expert_ids [T, k], combine [T, k], gate, up [E, d, f], down [E, f, d])`
is sum over the computed pairs (t, j) of combine[t, j] * (silu(x Wg) * (x Wu)) Wd of expert
expert_ids[t, j]; an id of -1 marks a pair that is not computed (dropped by the capacity limit,
or padding). The routing, the capacity limit and the combine weights stay in
moe_lvlm/models/moe.py; this replaces the gathers and the expert dots. Computed in float32
whatever the input dtype; under differentiation the forward keeps x Wg and x Wu of the computed
pairs and the custom VJP gives dx, d(combine) and the weight gradients. CPU only; the library
is built on first use (moe_lvlm/kernels/build.py). Under a mesh the call runs inside
`jax.shard_map` over the batch axes with the expert weights replicated (expert-parallel meshes
keep the routed path).

`dense_swiglu(x, gate [d, f], up, down [f, d])` is the same kernel on a dense SwiGLU FFN (one
expert, every token, weight 1): `model.dense_ffn='native'` for the decoder's dense layers.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moe_lvlm.kernels import build
from moe_lvlm.parallel.mesh import BATCH_AXES

Array = jax.Array

_FORWARD = "moe_lvlm_experts_forward"
_BACKWARD = "moe_lvlm_experts_backward"
ACTIVATIONS = ("silu",)  # the gated activations the kernel computes
MULTIPLE = 16  # d and f must be multiples of this


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA:CPU (warns once if not)."""
    return build.register("moe.cc", {_FORWARD: "MoeExpertsForward",
                                     _BACKWARD: "MoeExpertsBackward"})


def unsupported(activation: str, gated: bool, d: int, f: int) -> str | None:
    """Why the kernel cannot compute these experts, or None if it can."""
    if not gated or activation not in ACTIVATIONS:
        kind = f"gated {activation}" if gated else f"ungated {activation} MLP"
        return f"experts are {kind}; the native kernel computes gated {ACTIVATIONS} (SwiGLU)"
    if d % MULTIPLE or f % MULTIPLE:
        return f"model width {d} and expert hidden size {f} must be multiples of {MULTIPLE}"
    return None


def routed_swiglu(
    x: Array, expert_ids: Array, combine: Array, gate: Array, up: Array, down: Array,
    mesh: Mesh | None = None,
) -> Array:
    """x [..., d], expert_ids / combine [..., k] (id -1: not computed) -> [..., d] in x's dtype.

    Under `mesh` the leading axis is split over the batch axes."""
    if jax.default_backend() != "cpu":
        raise ValueError(f"native experts are CPU-only, not {jax.default_backend()}; "
                         "use model.moe.expert_compute='auto' or 'routed'")
    reason = unsupported("silu", True, x.shape[-1], gate.shape[-1])
    if reason:
        raise ValueError(f"native experts: {reason}")
    if not available():
        raise RuntimeError("native expert kernel unavailable (see the warning above); "
                           "use model.moe.expert_compute='routed'")
    f32 = [a.astype(jnp.float32) for a in (x, combine, gate, up, down)]

    def body(x_, ids_, comb_, g_, u_, d_):
        lead = x_.shape[:-1]
        y = _experts(x_.reshape(-1, x_.shape[-1]), ids_.reshape(-1, ids_.shape[-1]),
                     comb_.reshape(-1, comb_.shape[-1]), g_, u_, d_)
        return y.reshape(*lead, -1)

    if mesh is not None:
        rows = P(BATCH_AXES)
        body = jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rows, P(), P(), P()),
                             out_specs=rows, check_vma=False)
    y = body(f32[0], expert_ids.astype(jnp.int32), *f32[1:])
    return y.astype(x.dtype)


def dense_ffn_unsupported(
    activation: str, gated: bool, use_bias: bool, d: int, f: int, d_out: int, mesh: Mesh | None,
) -> str | None:
    """Why the kernel cannot compute this dense FFN, or None if it can."""
    if use_bias:
        return "the FFN has biases"
    if d_out != d:
        return f"output width {d_out} differs from input width {d}"
    if mesh is not None and mesh.shape["tensor"] > 1:
        return f"the mesh's tensor axis is {mesh.shape['tensor']} (the kernel needs whole weights)"
    return unsupported(activation, gated, d, f)


def resolve_dense_ffn(
    choice: str, activation: str, gated: bool, use_bias: bool, d: int, f: int, d_out: int,
    mesh: Mesh | None = None,
) -> str:
    """`model.dense_ffn` with 'auto' resolved: 'native' on CPU where the kernel builds and can
    compute this FFN, else 'xla'. Raises ValueError for a 'native' that cannot run."""
    if choice == "xla":
        return choice
    reason = dense_ffn_unsupported(activation, gated, use_bias, d, f, d_out, mesh)
    if not reason and jax.default_backend() != "cpu":
        reason = f"the backend is {jax.default_backend()} (the kernel is CPU-only)"
    if choice == "auto":
        return "native" if not reason and available() else "xla"
    if choice != "native":
        raise ValueError(f"model.dense_ffn={choice!r}: use 'auto', 'xla' or 'native'")
    if reason:
        raise ValueError(f"model.dense_ffn='native' cannot run: {reason}; use 'auto' or 'xla'")
    return choice


def dense_swiglu(
    x: Array, gate: Array, up: Array, down: Array, mesh: Mesh | None = None
) -> Array:
    """(silu(x Wg) * (x Wu)) Wd of x [..., d] with gate, up [d, f] and down [f, d], through the
    expert kernel as one expert taken by every token with weight 1."""
    lead = x.shape[:-1]
    ids = jnp.zeros((*lead, 1), jnp.int32)
    combine = jnp.ones((*lead, 1), jnp.float32)  # a constant: its gradient is dropped
    return routed_swiglu(x, ids, combine, gate[None], up[None], down[None], mesh)


def _forward(x, ids, combine, gate, up, down, save: bool):
    """y, and x Wg, x Wu of the computed pairs sorted by expert ([T * k, f]; [0, f] unless
    `save`)."""
    rows = ids.size if save else 0
    hidden = jax.ShapeDtypeStruct((rows, gate.shape[-1]), jnp.float32)
    shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32), hidden, hidden)
    call = jax.ffi.ffi_call(_FORWARD, shapes, vmap_method="sequential")
    return call(x, ids, combine, gate, up, down)


@jax.custom_vjp
def _experts(x, ids, combine, gate, up, down):
    return _forward(x, ids, combine, gate, up, down, save=False)[0]


def _experts_fwd(x, ids, combine, gate, up, down):
    y, g, u = _forward(x, ids, combine, gate, up, down, save=True)
    return y, (x, ids, combine, gate, up, down, g, u)


def _experts_bwd(residuals, dy):
    x, combine, gate, up, down = (residuals[i] for i in (0, 2, 3, 4, 5))
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, combine, gate, up, down))
    call = jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method="sequential")
    dx, dcombine, dgate, dup, ddown = call(*residuals, dy.astype(jnp.float32))
    return dx, None, dcombine, dgate, dup, ddown


_experts.defvjp(_experts_fwd, _experts_bwd)
