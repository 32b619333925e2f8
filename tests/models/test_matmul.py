"""The CPU matmuls with an explicit transposed weight gradient (moe_lvlm/models/matmul.py)
against float64 numpy: outputs and both gradients, over several leading and contracted dims,
eager and under jit (where XLA could fold the transpose back into the dot)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lvlm.models import matmul


def _check(fn, x, w, want, want_dx, want_dw, dy):
    for f in (fn, jax.jit(fn)):
        y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
        dx, dw = vjp(jnp.asarray(dy, jnp.float32))
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "x_shape, w_shape, in_dims",
    [((7, 5), (5, 3), 1), ((2, 3, 6), (6, 4, 2), 1), ((2, 5, 3, 4), (3, 4, 6), 2)],
)
def test_dense_matches_numpy(x_shape, w_shape, in_dims):
    rng = np.random.default_rng(len(x_shape) + in_dims)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    k = int(np.prod(w_shape[:in_dims]))
    lead, out = x_shape[: len(x_shape) - in_dims], w_shape[in_dims:]
    x2, w2 = x.reshape(-1, k).astype(np.float64), w.reshape(k, -1).astype(np.float64)
    dy = rng.standard_normal((*lead, *out))
    dy2 = dy.reshape(x2.shape[0], -1)
    _check(
        lambda a, b: matmul.dense(a, b, in_dims), x, w,
        (x2 @ w2).reshape(*lead, *out),
        (dy2 @ w2.T).reshape(x_shape),
        (x2.T @ dy2).reshape(w_shape),
        dy,
    )


def test_batched_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 9, 4)).astype(np.float32)
    w = rng.standard_normal((3, 4, 5)).astype(np.float32)
    dy = rng.standard_normal((3, 9, 5))
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    _check(
        matmul.batched, x, w,
        np.einsum("bmk,bkn->bmn", x64, w64),
        np.einsum("bmn,bkn->bmk", dy, w64),
        np.einsum("bmk,bmn->bkn", x64, dy),
        dy,
    )


def test_weight_gradient_is_a_plain_dot_on_cpu():
    """The compiled CPU gradient multiplies a materialised x^T: no dot contracts dim 0 of both
    operands (XLA:CPU's slow path this module exists to avoid)."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU lowering")
    x, w = jnp.ones((64, 16)), jnp.ones((16, 32))
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(matmul.dense(a, b) ** 2), argnums=1))
    hlo = grad.lower(x, w).compile().as_text()
    assert "lhs_contracting_dims={0}" not in hlo
