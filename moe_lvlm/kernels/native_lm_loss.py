"""'native' LM loss: the LM head and the token cross-entropy fused (lm_loss.cc) through `jax.ffi`.

`weighted_nll_sum(x [..., d], head [d, V], bias [V] | None, targets [...], weights [...])` is
sum over tokens of weight * -log softmax(x head + bias)[target]; tokens of weight 0 are not
computed. The kernel makes a tile of tokens' logits in cache and never writes them out. Under
differentiation one kernel call gives the loss and, from the same logits, the gradients of x,
the head and the bias (the backward scales them by the loss's cotangent: three GEMMs in all, no
recomputation); the weights get no gradient. float32 math whatever the input dtype. CPU only;
the library is built on first use (moe_lvlm/kernels/build.py). The backward's per-thread dW
buffers are capped at `grad_buffer_bytes` (default GRAD_BUFFER_BYTES): above it the kernel makes
the logits once more and splits dW by vocabulary columns instead (a large head on a many-core
host). Under a mesh the call runs inside
`jax.shard_map` over the batch axes with the head replicated and its gradient summed over the
shards. The training loss uses it with `model.lm_head_loss='native'` (moe_lvlm/train/step.py).
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

_FORWARD = "moe_lvlm_lm_loss_forward"
_FUSED = "moe_lvlm_lm_loss_forward_backward"
CHOICES = ("auto", "xla", "native")
MULTIPLE = 16  # the model width must be a multiple of this
# Above this the backward's per-thread dW buffers (threads x d x V floats) give way to a pass
# that splits dW by vocabulary columns (as fast at d=1024, V=32000 on 2 threads, 250 MB less;
# benchmarks/RESULTS.md); below it, e.g. the demo's 1 MB, the buffers save the extra GEMM.
GRAD_BUFFER_BYTES = 256 << 20
# 'auto' keeps XLA for wider models: at embed_dim 1024 and 2048 XLA's GEMMs run the head 1.7-2x
# faster than the kernel's (benchmarks/RESULTS.md, ninth session); up to 512 the kernel is as
# fast or faster, and it skips the tokens of weight 0.
AUTO_MAX_WIDTH = 512


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA:CPU (warns once if not)."""
    return build.register("lm_loss.cc", {_FORWARD: "LmLossForward",
                                             _FUSED: "LmLossForwardBackward"})


def unsupported(d: int, tensor_axis: int) -> str | None:
    """Why the kernel cannot compute the loss of this head, or None if it can."""
    if d % MULTIPLE:
        return f"model.decoder.embed_dim={d} must be a multiple of {MULTIPLE}"
    if tensor_axis > 1:
        return f"mesh tensor axis {tensor_axis} (the kernel needs the whole head)"
    return None


def resolve(choice: str, d: int, mesh: Mesh | None = None) -> str:
    """`model.lm_head_loss` with 'auto' resolved: 'native' on one CPU device where the kernel
    builds and can run and d <= AUTO_MAX_WIDTH, else 'xla' (multi-device CPU meshes, i.e. test
    meshes, keep 'xla' unless 'native' is asked for: it then runs in `jax.shard_map`). Raises
    ValueError for a 'native' that cannot run."""
    if choice not in CHOICES:
        raise ValueError(f"model.lm_head_loss={choice!r}: use one of {CHOICES}")
    if choice == "xla":
        return choice
    reason = unsupported(d, 1 if mesh is None else mesh.shape["tensor"])
    if not reason and jax.default_backend() != "cpu":
        reason = f"the backend is {jax.default_backend()} (the kernel is CPU-only)"
    if choice == "auto":
        one_device = mesh is None or mesh.size == 1
        narrow = d <= AUTO_MAX_WIDTH
        return "native" if not reason and one_device and narrow and available() else "xla"
    if not reason and not available():
        reason = "the kernel library is unavailable (see the warning above)"
    if reason:
        raise ValueError(f"model.lm_head_loss='native' cannot run: {reason}; use 'auto' or 'xla'")
    return choice


def weighted_nll_sum(
    x: Array, head: Array, bias: Array | None, targets: Array, weights: Array,
    mesh: Mesh | None = None, grad_buffer_bytes: int = GRAD_BUFFER_BYTES,
) -> Array:
    """x [..., d], head [d, V], bias [V] or None, targets / weights [...] -> the float32 scalar
    sum(weights * nll). Under `mesh` the leading axis is split over the batch axes.
    `grad_buffer_bytes`: the cap on the backward's per-thread dW buffers (module docstring)."""
    resolve("native", x.shape[-1], mesh)  # raises ValueError with the reason if it cannot run
    has_bias = bias is not None
    if not has_bias:
        bias = jnp.zeros(head.shape[-1], jnp.float32)
    args = [a.astype(jnp.float32) for a in (x, head, bias)]
    if not has_bias:
        args[2] = jax.lax.stop_gradient(args[2])
    return _loss(mesh, grad_buffer_bytes)(*args, targets.astype(jnp.int32),
                                          weights.astype(jnp.float32))


def _call(with_grads: bool, mesh, budget, x, head, bias, targets, weights):
    """Per-token nll [...], and with `with_grads` the gradients of sum(weights * nll) (dx [..., d],
    dhead, dbias: summed over the mesh's batch shards)."""

    def body(x_, head_, bias_, targets_, weights_):
        lead = x_.shape[:-1]
        flat = (x_.reshape(-1, x_.shape[-1]), head_, bias_, targets_.reshape(-1),
                weights_.reshape(-1))
        f32 = lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32)  # noqa: E731
        if not with_grads:
            nll = jax.ffi.ffi_call(_FORWARD, f32(flat[3]), vmap_method="sequential")(*flat)
            return nll.reshape(lead)
        shapes = (f32(flat[3]), f32(flat[0]), f32(head_), f32(bias_))
        nll, dx, dhead, dbias = jax.ffi.ffi_call(_FUSED, shapes, vmap_method="sequential")(
            *flat, grad_buffer_bytes=np.int64(budget))
        if mesh is not None:
            dhead, dbias = jax.lax.psum((dhead, dbias), BATCH_AXES)
        return nll.reshape(lead), dx.reshape(x_.shape), dhead, dbias

    if mesh is not None:
        rows = P(BATCH_AXES)
        body = jax.shard_map(body, mesh=mesh, in_specs=(rows, P(), P(), rows, rows),
                             out_specs=(rows, rows, P(), P()) if with_grads else rows,
                             check_vma=False)
    return body(x, head, bias, targets, weights)


@functools.cache
def _loss(mesh: Mesh | None, budget: int):
    """sum(weights * nll) with its custom VJP, for one mesh and dW buffer cap."""

    @jax.custom_vjp
    def loss(x, head, bias, targets, weights):
        return jnp.sum(_call(False, mesh, budget, x, head, bias, targets, weights) * weights)

    def fwd(x, head, bias, targets, weights):
        nll, dx, dhead, dbias = _call(True, mesh, budget, x, head, bias, targets, weights)
        return jnp.sum(nll * weights), (dx, dhead, dbias)

    def bwd(grads, g):
        return (*(a * g for a in grads), None, None)

    loss.defvjp(fwd, bwd)
    return loss
