"""Grouped matmul over rows sorted by group: out[r] = x[r] @ w[group of r].

x: [m, k] with rows grouped in order (group_sizes [g] sums to m); w: [g, k, n] -> [m, n].

Implementations:
  auto    per platform: 'tiled' on CPU, 'xla' elsewhere.
  xla     `jax.lax.ragged_dot` (every platform; its gradients are ragged dots too). XLA:CPU
          lowers it as every row times every group's weight (g times the FLOPs).
  tiled   dense batched matmuls over row tiles within one group (moe_lvlm/models/tiled_matmul.py).
  mosaic  Pallas Mosaic GPU kernels for Hopper (sm_90a): forward and input gradient with
          `ragged_dot_mgpu`, weight gradient with `transposed_ragged_dot_mgpu`, wired by a
          custom VJP. Needs k and n multiples of the block sizes below.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_lvlm.config import GROUPED_MATMULS
from moe_lvlm.models.tiled_matmul import tiled_grouped_matmul

Array = jax.Array


class Blocks(NamedTuple):
    """Tile sizes of one Mosaic GPU kernel (see jax.experimental.pallas.ops.gpu)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_block_n: int = 1


FORWARD_BLOCKS = Blocks()
WGRAD_BLOCKS = Blocks(max_concurrent_steps=2)


def grouped_matmul(
    x: Array, w: Array, group_sizes: Array, implementation: str = "xla"
) -> Array:
    """[m, k] x [g, k, n] -> [m, n] with rows of group i using w[i]."""
    if implementation == "auto":
        implementation = "tiled" if jax.default_backend() == "cpu" else "xla"
    if implementation == "tiled":
        return tiled_grouped_matmul(x, w, group_sizes)
    if implementation == "xla":
        return jax.lax.ragged_dot(x, w, group_sizes)
    if implementation == "mosaic":
        return mosaic_grouped_matmul(FORWARD_BLOCKS, WGRAD_BLOCKS)(x, w, group_sizes)
    raise ValueError(f"unknown grouped matmul {implementation!r}; choose one of {GROUPED_MATMULS}")


def custom_vjp_grouped_matmul(forward, input_grad, weight_grad):
    """A differentiable grouped matmul from three kernels:
    forward(x [m,k], w [g,k,n], sizes) -> [m,n]; input_grad(dy [m,n], w [g,k,n], sizes) -> [m,k]
    (dy @ w[i].T per group); weight_grad(x [m,k], dy [m,n], sizes) -> [g,k,n] (x_i.T @ dy_i)."""

    @jax.custom_vjp
    def gmm(x, w, group_sizes):
        return forward(x, w, group_sizes)

    def fwd(x, w, group_sizes):
        return forward(x, w, group_sizes), (x, w, group_sizes)

    def bwd(res, dy):
        x, w, group_sizes = res
        dy = dy.astype(x.dtype)
        dx = input_grad(dy, w, group_sizes).astype(x.dtype)
        dw = weight_grad(x, dy, group_sizes).astype(w.dtype)
        return dx, dw, None

    gmm.defvjp(fwd, bwd)
    return gmm


@functools.cache
def mosaic_grouped_matmul(forward_blocks: Blocks, wgrad_blocks: Blocks):
    """The Mosaic GPU grouped matmul with these tile sizes (Hopper only)."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    def forward(x, w, group_sizes):
        return ragged_dot_mgpu.ragged_dot(
            x, w.astype(x.dtype), group_sizes=group_sizes, **forward_blocks._asdict()
        )

    def input_grad(dy, w, group_sizes):
        return ragged_dot_mgpu.ragged_dot(
            dy, w.astype(dy.dtype), group_sizes=group_sizes, transpose_rhs=True,
            **forward_blocks._asdict(),
        )

    def weight_grad(x, dy, group_sizes):
        with jax.numpy_dtype_promotion("standard"):
            return transposed_ragged_dot_mgpu.transposed_ragged_dot(
                x, dy, group_sizes=group_sizes, **wgrad_blocks._asdict()
            )

    return custom_vjp_grouped_matmul(forward, input_grad, weight_grad)


def reference_kernels():
    """The three kernels written with jax.lax ops (any platform), for checking the VJP wiring."""

    def input_grad(dy, w, group_sizes):
        return jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), group_sizes)

    def weight_grad(x, dy, group_sizes):
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((0,), (0,)), ((), ())),
            lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[],
        )
        return jax.lax.ragged_dot_general(x, dy, group_sizes, dims)

    return jax.lax.ragged_dot, input_grad, weight_grad
