"""'native' attention: the fused C++ flash-attention kernel of attention.cc through `jax.ffi`.

Same semantics as `moe_lvlm.models.attention.blockwise_attention` (grouped-query heads, segment
ids with 0 = padding, causal or not, any length, a query that sees no key outputs 0), computed in
float32 whatever the input dtype. The forward returns the output and the log-sum-exp; the custom
VJP's backward recomputes the probabilities from it (FlashAttention-2). CPU only; the library is
built on first use (moe_lvlm/kernels/build.py). Under a mesh the call runs inside `jax.shard_map`
over the batch axes (and 'tensor' over heads where the key/value heads divide), so XLA never
partitions the custom call itself.
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

HEAD_DIMS = (8, 16, 32, 64, 128)  # the kernel's compiled head sizes
_FORWARD = "moe_lvlm_attention_forward"
_BACKWARD = "moe_lvlm_attention_backward"


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA:CPU (warns once if not)."""
    return build.register("attention.cc", {_FORWARD: "MoeAttentionForward",
                                           _BACKWARD: "MoeAttentionBackward"})


def native_attention(
    q: Array, k: Array, v: Array, segment_ids: Array | None, *, causal: bool,
    mesh: Mesh | None = None,
) -> Array:
    """q [b, s, heads, d], k/v [b, s, kv_heads, d] -> [b, s, heads, d] in q's dtype."""
    if jax.default_backend() != "cpu":
        raise ValueError(f"native attention is CPU-only, not {jax.default_backend()}; "
                         "use model.attention='auto'")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"native attention: head_dim {q.shape[-1]} not in {HEAD_DIMS}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if not available():
        raise RuntimeError("native attention kernel unavailable (see the warning above); "
                           "use model.attention='blockwise'")
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    args = (q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
            segment_ids.astype(jnp.int32))
    body = functools.partial(_attention, bool(causal))
    if mesh is not None:
        heads = "tensor" if k.shape[2] % mesh.shape["tensor"] == 0 else None
        spec = P(BATCH_AXES, None, heads)
        body = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, P(BATCH_AXES)),
                             out_specs=spec, check_vma=False)
    return body(*args).astype(q.dtype)


def _forward(causal, q, k, v, seg):
    b, s, h, _ = q.shape
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
              jax.ShapeDtypeStruct((b, h, s), jnp.float32))
    call = jax.ffi.ffi_call(_FORWARD, shapes, vmap_method="sequential")
    return call(q, k, v, seg, causal=np.int32(causal))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(causal, q, k, v, seg):
    return _forward(causal, q, k, v, seg)[0]


def _attention_fwd(causal, q, k, v, seg):
    out, lse = _forward(causal, q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _attention_bwd(causal, residuals, dout):
    q, k, v, seg, out, lse = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    call = jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method="sequential")
    dq, dk, dv = call(q, k, v, seg, out, lse, dout.astype(jnp.float32), causal=np.int32(causal))
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
