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
  megablox  the Pallas TPU kernels (`jax.experimental.pallas.ops.tpu.megablox`): `gmm` forward
          and input gradient, `tgmm` weight gradient (its own custom VJP); tiles from
          `megablox_tiling`; runs in Pallas interpret mode off TPU (slow: for tests).
  auto    `default_grouped_matmul(platform)`: megablox on TPU, tiled on CPU, xla elsewhere.
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
        implementation = default_grouped_matmul(jax.default_backend())
    if implementation == "tiled":
        return tiled_grouped_matmul(x, w, group_sizes)
    if implementation == "xla":
        return jax.lax.ragged_dot(x, w, group_sizes)
    if implementation == "mosaic":
        return mosaic_grouped_matmul(FORWARD_BLOCKS, WGRAD_BLOCKS)(x, w, group_sizes)
    if implementation == "megablox":
        return megablox_grouped_matmul(x, w, group_sizes)
    raise ValueError(f"unknown grouped matmul {implementation!r}; choose one of {GROUPED_MATMULS}")


def default_grouped_matmul(platform: str) -> str:
    """The grouped matmul `auto` picks: megablox on TPU; on CPU `tiled` (XLA:CPU lowers
    `ragged_dot` as every row times every expert); `jax.lax.ragged_dot` elsewhere (XLA:GPU has
    its own ragged-dot emitter; `mosaic` is opt-in because it needs Hopper and tile-aligned
    k, n)."""
    return {"tpu": "megablox", "cpu": "tiled"}.get(platform, "xla")


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(tm, tk, tn) for megablox on [m, k] x [g, k, n].

    Rule: tm = min(512, m rounded up to 8 rows), and `m` is padded to a multiple of tm (megablox
    needs m % tm == 0; a group's partial tile costs at most one extra tile per group); tk and tn
    are the largest of 1024, 512, 256, 128 that divides k (n), else min(1024, k (n) rounded up to
    128) with the kernel masking the ragged last tile. 512 x 1024 x 1024 is MaxText's default
    and keeps the bf16 operands and fp32 accumulator, double-buffered, near 10 MiB of VMEM.
    """

    def lane_tile(x: int) -> int:
        for t in (1024, 512, 256, 128):
            if x % t == 0:
                return t
        return min(1024, _round_up(x, 128))

    return min(512, _round_up(m, 8)), lane_tile(k), lane_tile(n)


def megablox_grouped_matmul(x: Array, w: Array, group_sizes: Array) -> Array:
    """megablox gmm (custom VJP: gmm for dx, tgmm for dw) with `megablox_tiling`.

    Rows are padded to a multiple of tm and cut off again. megablox leaves rows past the last
    group unwritten (NaN in interpret mode, garbage on TPU) in its output and in its input
    gradient, so those rows are selected to zero on the way in and out (the select's VJP zeros
    the input gradient there too)."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    m, k = x.shape
    tiling = megablox_tiling(m, k, w.shape[2])
    padded = _round_up(m, tiling[0])
    if padded != m:
        x = jnp.pad(x, ((0, padded - m), (0, 0)))
    in_groups = (jnp.arange(padded) < jnp.sum(group_sizes))[:, None]
    x = jnp.where(in_groups, x, 0)
    out = gmm(
        x,
        w.astype(x.dtype),
        group_sizes.astype(jnp.int32),
        preferred_element_type=x.dtype,
        tiling=tiling,
        interpret=jax.default_backend() != "tpu",
    )
    return jnp.where(in_groups, out, 0)[:m]


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
