"""'native' LM loss: the LM head and the token cross-entropy fused (lm_loss.cc) through `jax.ffi`.

`token_nll(x [..., d], head [d, V], bias [V] | None, targets [...], weights [...])` is
-log softmax(x head + bias)[target] per token, 0 where the weight is 0 (those tokens are not
computed). The kernel makes the logits in cache a tile of tokens and a chunk of the vocabulary at
a time and never writes them out; the custom VJP recomputes them for dx, d(head) and d(bias)
(the weights get no gradient). float32 math whatever the input dtype. CPU only; the library is
built on first use (moe_lvlm/kernels/build.py). Under a mesh the call runs inside
`jax.shard_map` over the batch axes with the head replicated (its gradient summed over the
shards). The training loss uses it with `model.lm_head_loss='native'` (moe_lvlm/train/step.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moe_lvlm.kernels import build
from moe_lvlm.parallel.mesh import BATCH_AXES

Array = jax.Array

_FORWARD = "moe_lvlm_lm_loss_forward"
_BACKWARD = "moe_lvlm_lm_loss_backward"
CHOICES = ("auto", "xla", "native")
MULTIPLE = 16  # the model width must be a multiple of this


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA:CPU (warns once if not)."""
    return build.register("lm_loss.cc", {_FORWARD: "LmLossForward", _BACKWARD: "LmLossBackward"})


def unsupported(d: int, tensor_axis: int) -> str | None:
    """Why the kernel cannot compute the loss of this head, or None if it can."""
    if d % MULTIPLE:
        return f"model.decoder.embed_dim={d} must be a multiple of {MULTIPLE}"
    if tensor_axis > 1:
        return f"mesh tensor axis {tensor_axis} (the kernel needs the whole head)"
    return None


def resolve(choice: str, d: int, mesh: Mesh | None = None) -> str:
    """`model.lm_head_loss` with 'auto' resolved: 'native' on one CPU device where the kernel
    builds and can run, else 'xla' (multi-device CPU meshes, i.e. test meshes, keep 'xla' unless
    'native' is asked for: it then runs in `jax.shard_map`). Raises ValueError for a 'native'
    that cannot run."""
    if choice not in CHOICES:
        raise ValueError(f"model.lm_head_loss={choice!r}: use one of {CHOICES}")
    if choice == "xla":
        return choice
    reason = unsupported(d, 1 if mesh is None else mesh.shape["tensor"])
    if not reason and jax.default_backend() != "cpu":
        reason = f"the backend is {jax.default_backend()} (the kernel is CPU-only)"
    if choice == "auto":
        one_device = mesh is None or mesh.size == 1
        return "native" if not reason and one_device and available() else "xla"
    if not reason and not available():
        reason = "the kernel library is unavailable (see the warning above)"
    if reason:
        raise ValueError(f"model.lm_head_loss='native' cannot run: {reason}; use 'auto' or 'xla'")
    return choice


def token_nll(
    x: Array, head: Array, bias: Array | None, targets: Array, weights: Array,
    mesh: Mesh | None = None,
) -> Array:
    """x [..., d], head [d, V], bias [V] or None, targets / weights [...] -> nll [...] float32,
    0 where weights == 0. Under `mesh` the leading axis is split over the batch axes."""
    resolve("native", x.shape[-1], mesh)  # raises ValueError with the reason if it cannot run
    has_bias = bias is not None
    if bias is None:
        bias = jnp.zeros(head.shape[-1], jnp.float32)
    f32 = [a.astype(jnp.float32) for a in (x, head, bias)]

    def body(x_, head_, bias_, targets_, weights_):
        lead = x_.shape[:-1]
        nll = _nll(x_.reshape(-1, x_.shape[-1]), head_, bias_, targets_.reshape(-1),
                   weights_.reshape(-1))
        return nll.reshape(lead)

    if mesh is not None:
        rows = P(BATCH_AXES)
        body = jax.shard_map(body, mesh=mesh, in_specs=(rows, P(), P(), rows, rows),
                             out_specs=rows, check_vma=False)
    if not has_bias:
        f32[2] = jax.lax.stop_gradient(f32[2])
    return body(*f32, targets.astype(jnp.int32), weights.astype(jnp.float32))


def _forward(x, head, bias, targets, weights):
    shapes = (jax.ShapeDtypeStruct(x.shape[:1], jnp.float32),) * 2
    call = jax.ffi.ffi_call(_FORWARD, shapes, vmap_method="sequential")
    return call(x, head, bias, targets, weights)


@jax.custom_vjp
def _nll(x, head, bias, targets, weights):
    return _forward(x, head, bias, targets, weights)[0]


def _nll_fwd(x, head, bias, targets, weights):
    nll, lse = _forward(x, head, bias, targets, weights)
    return nll, (x, head, bias, targets, weights, lse)


def _nll_bwd(residuals, g):
    x, head, bias, targets, weights, lse = residuals
    g = jnp.where(weights != 0, g.astype(jnp.float32), 0.0)  # the skipped tokens' nll is 0
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, head, bias))
    call = jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method="sequential")
    dx, dhead, dbias = call(x, head, bias, targets, g, lse)
    return dx, dhead, dbias, None, None


_nll.defvjp(_nll_fwd, _nll_bwd)
