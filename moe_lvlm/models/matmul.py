"""Matmuls whose weight gradient XLA:CPU computes with its fast dot kernels.

The weight gradient of y = x w is x^T dy, a contraction over the tokens, i.e. over the leading
dimension of both operands. XLA:CPU hands plain [m, k] x [k, n] dots (and x w^T) to YNNPACK,
but runs this transposed-operand form with its slower Eigen dot and usually adds a transposing
copy before it (benchmarks/RESULTS.md, issue 15, third session: 1.6-2x slower per dot at the
benchmark shapes). On CPU, `dense` and `batched` therefore have a custom VJP that transposes x
explicitly (a copy that `optimization_barrier` keeps from being folded back into the dot) and
then multiplies [k, m] x [m, n]. Elsewhere they are plain `dot_general`s. Same values either way
(the summation order of the dot may differ).
"""

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def _cpu() -> bool:
    return jax.default_backend() == "cpu"


def dense(x: Array, w: Array, in_dims: int = 1) -> Array:
    """x [..., K...] times w [K..., N...] over the `in_dims` trailing dims of x -> [..., N...]."""
    if not _cpu():
        contract = tuple(range(x.ndim - in_dims, x.ndim))
        return jax.lax.dot_general(x, w, ((contract, tuple(range(in_dims))), ((), ())))
    lead, k_shape, n_shape = x.shape[: x.ndim - in_dims], w.shape[:in_dims], w.shape[in_dims:]
    k, n = math.prod(k_shape), math.prod(n_shape)
    y = _matmul_2d(x.reshape(-1, k), w.reshape(k, n))
    return y.reshape(*lead, *n_shape)


def batched(x: Array, w: Array) -> Array:
    """[b, m, k] x [b, k, n] -> [b, m, n]."""
    if not _cpu():
        return jnp.einsum("bmk,bkn->bmn", x, w)
    return _matmul_batched(x, w)


def _transposed(x: Array) -> Array:
    """x with its last two axes swapped, materialised (not folded into the next dot)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@jax.custom_vjp
def _matmul_2d(x: Array, w: Array) -> Array:
    return jnp.matmul(x, w)


def _matmul_2d_fwd(x, w):
    return jnp.matmul(x, w), (x, w)


def _matmul_2d_bwd(res, dy):
    x, w = res
    dx = jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())))  # dy w^T
    dw = jnp.matmul(_transposed(x), dy.astype(x.dtype))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


@jax.custom_vjp
def _matmul_batched(x: Array, w: Array) -> Array:
    return jnp.einsum("bmk,bkn->bmn", x, w)


def _matmul_batched_fwd(x, w):
    return _matmul_batched(x, w), (x, w)


def _matmul_batched_bwd(res, dy):
    x, w = res
    dx = jnp.einsum("bmn,bkn->bmk", dy, w)
    dw = jnp.einsum("bkm,bmn->bkn", _transposed(x), dy.astype(x.dtype))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_batched.defvjp(_matmul_batched_fwd, _matmul_batched_bwd)
