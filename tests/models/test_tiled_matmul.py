"""The tiled grouped matmul (moe_lvlm/models/tiled_matmul.py) against numpy: output, input and
weight gradients, with an empty group and group sizes that are not multiples of the tile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lvlm.models.tiled_matmul import tiled_experts, tiled_grouped_matmul


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


def _np_ffn(w, x, group, gated):
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    if gated:
        g = np.einsum("mk,mkn->mn", x, w["gate"][group])
        u = np.einsum("mk,mkn->mn", x, w["up"][group])
        return np.einsum("mn,mnd->md", silu(g) * u, w["down"][group])
    h = silu(np.einsum("mk,mkn->mn", x, w["fc1"][group]) + w["fc1_bias"][group])
    return np.einsum("mn,mnd->md", h, w["fc2"][group]) + w["fc2_bias"][group]


@pytest.mark.parametrize("gated", [True, False])
def test_tiled_experts_match_numpy(gated):
    """The expert FFN in tile space (weights and activation recomputed in the backward pass)
    against numpy: output, and input / weight gradients by central differences of the numpy
    FFN along one random direction each."""
    sizes, tile, d, f = (5, 0, 9, 3), 4, 6, 5
    rng = np.random.default_rng(7)
    shapes = ({"gate": (4, d, f), "up": (4, d, f), "down": (4, f, d)} if gated else
              {"fc1": (4, d, f), "fc1_bias": (4, f), "fc2": (4, f, d), "fc2_bias": (4, d)})
    w = {k: rng.standard_normal(s) for k, s in shapes.items()}
    x = rng.standard_normal((sum(sizes), d))
    group = np.repeat(np.arange(4), sizes)
    dy = rng.standard_normal((sum(sizes), d))

    def loss(w_, x_):
        return jnp.sum(tiled_experts(w_, x_, jnp.asarray(sizes, jnp.int32), jax.nn.silu, gated,
                                     tile) * dy.astype(np.float32))

    w32 = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
    x32 = jnp.asarray(x, jnp.float32)
    y = tiled_experts(w32, x32, jnp.asarray(sizes, jnp.int32), jax.nn.silu, gated, tile)
    np.testing.assert_allclose(np.asarray(y), _np_ffn(w, x, group, gated), rtol=1e-4, atol=1e-4)
    gw, gx = jax.grad(loss, argnums=(0, 1))(w32, x32)
    eps = 1e-6
    for name, grad, base in [("x", gx, x)] + [(k, gw[k], w[k]) for k in w]:
        direction = rng.standard_normal(base.shape)
        def plus(s, name=name, base=base, direction=direction):
            args = dict(w, **({} if name == "x" else {name: base + s * direction}))
            xs = x + s * direction if name == "x" else x
            return np.sum(_np_ffn(args, xs, group, gated) * dy)
        want = (plus(eps) - plus(-eps)) / (2 * eps)
        np.testing.assert_allclose(np.sum(np.asarray(grad) * direction), want, rtol=1e-3,
                                   err_msg=name)
