"""The custom-VJP grouped matmul (the wiring of the Mosaic GPU kernels) against numpy, on CPU,
with kernels written from jax.lax ops standing in for the GPU ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lvlm.models import grouped_matmul as gm


def np_grouped(x, w, sizes):
    out, start = [], 0
    for g, n in enumerate(sizes):
        out.append(x[start:start + n] @ w[g])
        start += n
    return np.concatenate(out)


@pytest.mark.parametrize("sizes", [(3, 0, 5, 4), (12, 0, 0, 0), (1, 2, 3, 6)])
def test_custom_vjp_matches_numpy(sizes):
    rng = np.random.default_rng(0)
    m, k, n = sum(sizes), 5, 7
    x = rng.standard_normal((m, k))
    w = rng.standard_normal((len(sizes), k, n))
    dy = rng.standard_normal((m, n))
    gmm = gm.custom_vjp_grouped_matmul(*gm.reference_kernels())
    group_sizes = jnp.asarray(sizes, jnp.int32)
    y, vjp = jax.vjp(lambda a, b: gmm(a, b, group_sizes), jnp.asarray(x, jnp.float32),
                     jnp.asarray(w, jnp.float32))
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    np.testing.assert_allclose(y, np_grouped(x, w, sizes), rtol=1e-5, atol=1e-5)
    # y = x_g @ w_g per group: dx_g = dy_g @ w_g^T, dw_g = x_g^T @ dy_g (zero for empty groups).
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)
    spans = list(zip(starts, ends, strict=True))
    want_dx = np.concatenate([dy[s:e] @ w[g].T for g, (s, e) in enumerate(spans)])
    want_dw = np.stack([x[s:e].T @ dy[s:e] for s, e in spans])
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


def test_xla_implementation_is_ragged_dot_and_unknown_names_are_refused():
    x = jnp.ones((4, 3))
    w = jnp.arange(24.0).reshape(2, 3, 4)
    sizes = jnp.asarray([1, 3], jnp.int32)
    np.testing.assert_array_equal(gm.grouped_matmul(x, w, sizes, "xla"),
                                  jax.lax.ragged_dot(x, w, sizes))
    with pytest.raises(ValueError, match="unknown grouped matmul 'cutlass'"):
        gm.grouped_matmul(x, w, sizes, "cutlass")
