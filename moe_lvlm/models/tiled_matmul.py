"""A grouped matmul from dense batched matmuls over row tiles, each tile inside one group.

Rows sorted by group are spread into tiles of `tile` rows so that no tile spans two groups (each
group padded to whole tiles with zero rows), every tile is multiplied by its group's weight
(one batched matmul [tiles, tile, k] x [tiles, k, n]), and the rows are read back. FLOPs are
those of the rows plus at most one tile of padding per group, not E times the rows as XLA's
dense lowering of `jax.lax.ragged_dot` on CPU; gradients come from autodiff (the gathers'
transposes are scatter-adds, the weight gradient sums the tiles of each group).

`tiled_experts` runs a whole expert FFN in tile space (rows tiled once, read back once), and
the per-tile weights [tiles, k, n] and the activation are recomputed in the backward pass
(moe_lvlm/models/recompute.py) instead of kept from the forward pass.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_lvlm.models import matmul
from moe_lvlm.models.recompute import recompute

Array = jax.Array

TILE = 128


class Tiles(NamedTuple):
    """Where rows sorted by group go among whole tiles of one group each."""

    position: Array  # [rows]: the padded slot of each row
    source: Array  # [tiles * tile]: the row that fills each slot (`rows`: none, a zero row)
    group: Array  # [tiles]: the group of each tile
    tile: int


def tile_layout(group_sizes: Array, rows: int, tile: int = TILE) -> Tiles:
    """The tiles of `rows` rows sorted by group (group_sizes [g]); `tile` capped at `rows`."""
    groups = group_sizes.shape[0]
    tile = max(1, min(tile, rows))
    tiles = -(-rows // tile) + groups
    padded = -(-group_sizes // tile) * tile
    start = jnp.cumsum(group_sizes) - group_sizes
    padded_start = jnp.cumsum(padded) - padded
    group_of_row = jnp.repeat(
        jnp.arange(groups, dtype=jnp.int32), group_sizes, total_repeat_length=rows
    )
    position = padded_start[group_of_row] + jnp.arange(rows) - start[group_of_row]
    source = jnp.full((tiles * tile,), rows, jnp.int32).at[position].set(
        jnp.arange(rows, dtype=jnp.int32), mode="drop"
    )
    group = jnp.minimum(
        jnp.searchsorted(jnp.cumsum(padded), jnp.arange(tiles) * tile, side="right"), groups - 1
    )
    return Tiles(position, source, group, tile)


def to_tiles(x: Array, t: Tiles) -> Array:
    """[rows, k] -> [tiles, tile, k], padding slots zero."""
    xz = jnp.concatenate([x, jnp.zeros_like(x[:1])], axis=0)
    return jnp.take(xz, t.source, axis=0, mode="clip").reshape(-1, t.tile, x.shape[-1])


def from_tiles(y: Array, t: Tiles) -> Array:
    """[tiles, tile, n] -> [rows, n]: the rows' slots in order."""
    return jnp.take(y.reshape(-1, y.shape[-1]), t.position, axis=0, mode="clip")


@recompute
def _tile_matmul(xt: Array, w: Array, group: Array) -> Array:
    wt = jnp.take(w, group, axis=0, mode="clip").astype(xt.dtype)
    return matmul.batched(xt, wt)


def tiles_matmul(xt: Array, w: Array, t: Tiles) -> Array:
    """[tiles, tile, k] x [g, k, n] -> [tiles, tile, n], each tile times its group's weight."""
    return _tile_matmul(xt, w, t.group)


def tiled_grouped_matmul(x: Array, w: Array, group_sizes: Array, tile: int = TILE) -> Array:
    """[m, k] x [g, k, n] -> [m, n]: rows of group i (in order) times w[i]."""
    t = tile_layout(group_sizes, x.shape[0], tile)
    return from_tiles(tiles_matmul(to_tiles(x, t), w, t), t)


def tiled_experts(
    weights: dict[str, Array], x: Array, group_sizes: Array, act: Callable[[Array], Array],
    gated: bool, tile: int = TILE,
) -> Array:
    """An expert FFN over rows sorted by expert, in tile space. x: [m, d] -> [m, d_out].

    Gated: down(act(x gate) * (x up)); else fc2(act(x fc1 + b1)) + b2 (biases [g, n])."""
    t = tile_layout(group_sizes, x.shape[0], tile)
    xt = to_tiles(x, t)
    if gated:
        h = recompute(lambda g, u: act(g) * u)(
            tiles_matmul(xt, weights["gate"], t), tiles_matmul(xt, weights["up"], t)
        )
        return from_tiles(tiles_matmul(h, weights["down"], t), t)
    bias = lambda name: weights[name][t.group][:, None].astype(x.dtype)  # noqa: E731
    h = recompute(act)(tiles_matmul(xt, weights["fc1"], t) + bias("fc1_bias"))
    return from_tiles(tiles_matmul(h, weights["fc2"], t) + bias("fc2_bias"), t)
