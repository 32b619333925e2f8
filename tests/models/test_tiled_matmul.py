"""The tiled grouped matmul (moe_lvlm/models/tiled_matmul.py) against numpy: output, input and
weight gradients, with an empty group and group sizes that are not multiples of the tile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lvlm.models.tiled_matmul import tiled_grouped_matmul


@pytest.mark.parametrize("sizes, tile", [((5, 0, 9, 3), 4), ((1, 1, 1, 1), 8), ((16, 0, 0, 0), 4)])
def test_tiled_matches_numpy(sizes, tile):
    rng = np.random.default_rng(sum(sizes))
    m, k, n = sum(sizes), 6, 5
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((len(sizes), k, n)).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    group = np.repeat(np.arange(len(sizes)), sizes)
    want = np.einsum("mk,mkn->mn", x, w[group])
    want_dx = np.einsum("mn,mkn->mk", dy, w[group])
    want_dw = np.zeros_like(w)
    np.add.at(want_dw, group, np.einsum("mk,mn->mkn", x, dy))

    sizes_j = jnp.asarray(sizes, jnp.int32)
    y, vjp = jax.vjp(lambda a, b: tiled_grouped_matmul(a, b, sizes_j, tile), x, w)
    dx, dw = vjp(jnp.asarray(dy))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-5)
