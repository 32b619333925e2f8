"""A grouped matmul from dense batched matmuls over row tiles, each tile inside one group.

Rows sorted by group are spread into tiles of `tile` rows so that no tile spans two groups (each
group padded to whole tiles with zero rows), every tile is multiplied by its group's weight
(one batched matmul [tiles, tile, k] x [tiles, k, n]), and the rows are read back. FLOPs are
those of the rows plus at most one tile of padding per group, not E times the rows as XLA's
dense lowering of `jax.lax.ragged_dot` on CPU; gradients come from autodiff (the gathers'
transposes are scatter-adds, the weight gradient sums the tiles of each group).
"""

import jax
import jax.numpy as jnp

Array = jax.Array

TILE = 128


def tile_layout(group_sizes: Array, rows: int, tile: int) -> tuple[Array, Array, int]:
    """Where each sorted row goes among the padded tiles [rows], which row fills each padded
    slot [tiles * tile] (`rows`: none), and the static number of tiles."""
    groups = group_sizes.shape[0]
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
    return position, source, tiles


def tiled_grouped_matmul(x: Array, w: Array, group_sizes: Array, tile: int = TILE) -> Array:
    """[m, k] x [g, k, n] -> [m, n]: rows of group i (in order) times w[i]."""
    rows, groups = x.shape[0], w.shape[0]
    tile = max(1, min(tile, rows))
    position, source, tiles = tile_layout(group_sizes, rows, tile)
    padded_ends = jnp.cumsum(-(-group_sizes // tile) * tile)
    tile_group = jnp.minimum(
        jnp.searchsorted(padded_ends, jnp.arange(tiles) * tile, side="right"), groups - 1
    )
    xz = jnp.concatenate([x, jnp.zeros_like(x[:1])], axis=0)
    xt = jnp.take(xz, source, axis=0, mode="clip").reshape(tiles, tile, -1)
    yt = jnp.einsum("tmk,tkn->tmn", xt, jnp.take(w, tile_group, axis=0).astype(x.dtype))
    return jnp.take(yt.reshape(tiles * tile, -1), position, axis=0, mode="clip")
