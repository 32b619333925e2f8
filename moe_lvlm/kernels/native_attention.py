"""'native' attention: the fused C++ flash-attention kernel of attention.cc through `jax.ffi`.

Same semantics as `moe_lvlm.models.attention.blockwise_attention` (grouped-query heads, segment
ids with 0 = padding, causal or not, any length, a query that sees no key outputs 0), computed in
float32 whatever the input dtype. With `rope=(positions, inv_freq)` the kernel also applies rotary
embedding to q and k as it loads them (HF rotate_half over the first 2 * len(inv_freq) features,
angle float32(position) * inv_freq, as `moe_lvlm.models.layers.rope`), and its backward returns
the gradients with respect to the un-rotated q and k: no rotated copy is written. With
`qk_norm=(q_scale, k_scale, eps)` it first applies RMSNorm over the head (qk-norm) to each q / k
row too, and the backward also gives the scales' gradients (per-task partial sums added in XLA,
in a fixed order). The forward
returns the output and the log-sum-exp; the custom VJP's backward recomputes the probabilities
from it (FlashAttention-2). CPU only; the library is built on first use
(moe_lvlm/kernels/build.py). Under a mesh the call runs inside `jax.shard_map` over the batch axes
(and 'tensor' over heads where the key/value heads divide), so XLA never partitions the custom
call itself.
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
_ROPE_FORWARD = "moe_lvlm_attention_rope_forward"
_ROPE_BACKWARD = "moe_lvlm_attention_rope_backward"
_NORM_FORWARD = "moe_lvlm_attention_norm_rope_forward"
_NORM_BACKWARD = "moe_lvlm_attention_norm_rope_backward"


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA:CPU (warns once if not)."""
    return build.register("attention.cc", {_FORWARD: "MoeAttentionForward",
                                           _BACKWARD: "MoeAttentionBackward",
                                           _ROPE_FORWARD: "MoeAttentionRopeForward",
                                           _ROPE_BACKWARD: "MoeAttentionRopeBackward",
                                           _NORM_FORWARD: "MoeAttentionNormRopeForward",
                                           _NORM_BACKWARD: "MoeAttentionNormRopeBackward"})


def native_attention(
    q: Array, k: Array, v: Array, segment_ids: Array | None, *, causal: bool,
    mesh: Mesh | None = None, rope: tuple[Array, Array] | None = None,
    qk_norm: tuple[Array, Array, float] | None = None,
) -> Array:
    """q [b, s, heads, d], k/v [b, s, kv_heads, d] -> [b, s, heads, d] in q's dtype. `rope`:
    (positions [b, s] int, inv_freq [r / 2] float32, r <= d even) to rotate q and k by first;
    `qk_norm`: (q_scale [d], k_scale [d], eps) of an RMSNorm applied to q and k before that."""
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
    extra_specs = ()
    if rope is None and qk_norm is not None:  # the norm's entry point: no rotation
        rope = (jnp.zeros(q.shape[:2], jnp.int32), jnp.zeros((0,), jnp.float32))
    if rope is not None:
        positions, inv_freq = rope
        if inv_freq.ndim != 1 or 2 * inv_freq.shape[0] > q.shape[-1]:
            raise ValueError(f"native attention: inv_freq of shape {inv_freq.shape} does not fit "
                             f"head_dim {q.shape[-1]}")
        args += (positions.astype(jnp.int32), inv_freq.astype(jnp.float32))
        extra_specs = (P(BATCH_AXES), P())
    eps = None
    if qk_norm is not None:
        q_scale, k_scale, eps = qk_norm
        args += (q_scale.astype(jnp.float32), k_scale.astype(jnp.float32))
        extra_specs += (P(), P())
        eps = float(eps)
    body = functools.partial(_attention, (bool(causal), eps))
    if mesh is not None:
        heads = "tensor" if k.shape[2] % mesh.shape["tensor"] == 0 else None
        spec = P(BATCH_AXES, None, heads)
        body = jax.shard_map(body, mesh=mesh,
                             in_specs=(spec, spec, spec, P(BATCH_AXES), *extra_specs),
                             out_specs=spec, check_vma=False)
    return body(*args).astype(q.dtype)


def _forward(static, q, k, v, seg, *extras):
    causal, eps = static
    b, s, h, _ = q.shape
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
              jax.ShapeDtypeStruct((b, h, s), jnp.float32))
    if eps is not None:
        call = jax.ffi.ffi_call(_NORM_FORWARD, shapes, vmap_method="sequential")
        return call(q, k, v, seg, *extras, causal=np.int32(causal), eps=np.float32(eps))
    call = jax.ffi.ffi_call(_ROPE_FORWARD if extras else _FORWARD, shapes,
                            vmap_method="sequential")
    return call(q, k, v, seg, *extras, causal=np.int32(causal))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q, k, v, seg, *extras):
    """static: (causal, qk-norm eps or None); extras: (), (positions, inv_freq) or those and
    (q_scale, k_scale)."""
    return _forward(static, q, k, v, seg, *extras)[0]


def _attention_fwd(static, q, k, v, seg, *extras):
    out, lse = _forward(static, q, k, v, seg, *extras)
    return out, (q, k, v, seg, extras, out, lse)


def _attention_bwd(static, residuals, dout):
    causal, eps = static
    q, k, v, seg, extras, out, lse = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    inputs = (q, k, v, seg, *extras, out, lse, dout.astype(jnp.float32))
    if eps is None:
        call = jax.ffi.ffi_call(_ROPE_BACKWARD if extras else _BACKWARD, shapes,
                                vmap_method="sequential")
        dq, dk, dv = call(*inputs, causal=np.int32(causal))
        return (dq, dk, dv, None) + tuple(None for _ in extras)
    partials = jax.ShapeDtypeStruct((q.shape[0] * k.shape[2], 2, q.shape[3]), jnp.float32)
    call = jax.ffi.ffi_call(_NORM_BACKWARD, (*shapes, partials), vmap_method="sequential")
    dq, dk, dv, dscale = call(*inputs, causal=np.int32(causal), eps=np.float32(eps))
    dscale = jnp.sum(dscale, axis=0)
    return dq, dk, dv, None, None, None, dscale[0], dscale[1]


_attention.defvjp(_attention_fwd, _attention_bwd)
