"""The native fused expert kernel (moe_lvlm/kernels/moe.cc) against the routed SwiGLU FFN and its
gradients written out in numpy (float64, a loop over pairs); and the MoE layer with
`expert_compute='native'` against the same layer with 'routed' (capacity and dropless)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lvlm.kernels import native_moe
from moe_lvlm.models import moe
from tests.models.fast import fast_jit
from tests.models.test_moe_reference import moe_config, padding_mask, random_moe_params

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not native_moe.available(),
    reason="native kernels are CPU-only and need g++",
)


def np_routed(x, ids, combine, gate, up, down, dy):
    """y and (dx, dcombine, dgate, dup, ddown) of sum over pairs with id >= 0 of
    combine * (silu(x Wg) * x Wu) Wd, for the cotangent dy; float64."""
    x, combine, gate, up, down, dy = (a.astype(np.float64) for a in (x, combine, gate, up,
                                                                      down, dy))
    y, dx, dc = np.zeros_like(x), np.zeros_like(x), np.zeros_like(combine)
    dg_w, du_w, dd_w = np.zeros_like(gate), np.zeros_like(up), np.zeros_like(down)
    for t, j in np.ndindex(ids.shape):
        e = ids[t, j]
        if e < 0:
            continue
        g, u = x[t] @ gate[e], x[t] @ up[e]
        s = 1 / (1 + np.exp(-g))
        h = g * s * u
        out = h @ down[e]
        c = combine[t, j]
        y[t] += c * out
        dc[t, j] = dy[t] @ out
        dh = c * (down[e] @ dy[t])
        dd_w[e] += np.outer(h, c * dy[t])
        du = dh * g * s
        dg = dh * u * s * (1 + g * (1 - s))
        dg_w[e] += np.outer(x[t], dg)
        du_w[e] += np.outer(x[t], du)
        dx[t] += gate[e] @ dg + up[e] @ du
    return y, (dx, dc, dg_w, du_w, dd_w)


def random_case(tokens, k, num_experts, d=16, f=32, seed=0, empty_expert=True):
    """Inputs with dropped pairs (-1), a padding token (all -1) and, if asked, an expert that
    receives no token."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, d)).astype(np.float32)
    high = num_experts - 1 if empty_expert else num_experts
    ids = np.stack([rng.permutation(high)[:k] for _ in range(tokens)]).astype(np.int32)
    ids[rng.random(ids.shape) < 0.2] = -1
    ids[tokens // 2] = -1
    combine = rng.random((tokens, k)).astype(np.float32)
    gate, up = (rng.normal(size=(num_experts, d, f)).astype(np.float32) / 4 for _ in range(2))
    down = rng.normal(size=(num_experts, f, d)).astype(np.float32) / 6
    dy = rng.normal(size=(tokens, d)).astype(np.float32)
    return x, ids, combine, gate, up, down, dy


# Tokens not a multiple of the 48-row tile; top-1 and top-2; experts with more than one tile.
@pytest.mark.parametrize("tokens, k, num_experts", [(7, 1, 3), (101, 2, 4), (130, 2, 3)])
def test_kernel_matches_numpy(tokens, k, num_experts):
    x, ids, combine, gate, up, down, dy = random_case(tokens, k, num_experts, seed=tokens)
    assert (ids[ids >= 0] == num_experts - 1).sum() == 0  # the last expert gets no token

    def f(x_, c_, g_, u_, d_):
        return native_moe.routed_swiglu(x_, jnp.asarray(ids), c_, g_, u_, d_)

    y, vjp = jax.vjp(jax.jit(f), x, combine, gate, up, down)
    grads = vjp(jnp.asarray(dy))
    want_y, want_grads = np_routed(x, ids, combine, gate, up, down, dy)
    np.testing.assert_allclose(y, want_y, atol=2e-5, rtol=1e-4)
    assert not np.asarray(y)[tokens // 2].any()  # a token with no computed pair gets 0
    for name, got, want in zip(("dx", "dcombine", "dgate", "dup", "ddown"), grads, want_grads,
                               strict=True):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4, err_msg=name)
    assert not np.asarray(grads[1])[ids < 0].any()  # not computed: no combine gradient
    assert not np.asarray(grads[2])[num_experts - 1].any()


def test_kernel_rejects_bad_ids():
    x, ids, combine, gate, up, down, _ = random_case(8, 2, 3)
    ids[3, 1] = 3
    with pytest.raises(Exception, match="outside"):
        native_moe.routed_swiglu(x, ids, combine, gate, up, down).block_until_ready()


def test_unsupported_experts_are_named():
    assert "gelu" in native_moe.unsupported("gelu", False, 16, 32)
    assert "multiples of 16" in native_moe.unsupported("silu", True, 12, 32)
    assert native_moe.unsupported("silu", True, 16, 32) is None


# The layer: native against routed (the kernel replaces the gathers and expert dots only).
LAYER_CASES = {
    "dropless_k2": dict(dispatch="dropless"),
    "capacity_drops_k2": dict(dispatch="capacity", capacity_factor_train=0.75),
    "capacity_renorm_kept_batch_shard": dict(
        dispatch="capacity", combine_weights="renorm_kept", capacity_group="batch_shard",
        capacity_factor_train=0.75),
    "capacity_k1": dict(dispatch="capacity", top_k=1, capacity_factor_train=1.0),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_native_matches_routed(case):
    batch, seq, d, hidden = 3, 12, 16, 32
    rng = np.random.default_rng(len(case))
    outs = {}
    for compute in ("routed", "native"):
        cfg = moe_config(expert_compute=compute, **LAYER_CASES[case])
        params = random_moe_params(np.random.default_rng(0), d, hidden, d, cfg.num_experts, True)
        x = (np.random.default_rng(1).normal(size=(batch, seq, d)) + 1.0).astype(np.float32)
        valid = padding_mask(np.random.default_rng(2), batch, seq)
        cot = rng.normal(size=(batch, seq, d)).astype(np.float32) if not outs else outs["cot"]
        layer = moe.MoeFeedForward(cfg, hidden)

        def loss(p, x_, layer=layer, valid=valid, cot=cot):
            y, metrics = layer.apply({"params": p}, x_, valid, train=True)
            return jnp.sum(y * cot), (y, metrics)

        grad = fast_jit(jax.grad(loss, argnums=(0, 1), has_aux=True), params, x)
        outs[compute] = grad(params, x)
        outs["cot"] = cot
    (gp_r, gx_r), (y_r, m_r) = outs["routed"]
    (gp_n, gx_n), (y_n, m_n) = outs["native"]
    np.testing.assert_allclose(y_n, y_r, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(gx_n, gx_r, atol=2e-5, rtol=1e-4)
    for path, want in jax.tree_util.tree_leaves_with_path(gp_r):
        got = dict(jax.tree_util.tree_leaves_with_path(gp_n))[path]
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=str(path))
    for name in m_r:
        np.testing.assert_allclose(m_n[name], m_r[name], rtol=1e-6, err_msg=name)
    if case.startswith("capacity_drops"):
        assert m_r["dropped_fraction"] > 0.05


def test_native_rejects_ungated_experts():
    cfg = moe_config(expert_compute="native")
    layer = moe.MoeFeedForward(cfg, 32, activation="gelu", gated=False)
    x = jnp.ones((1, 4, 16))
    with pytest.raises(ValueError, match="native kernel computes gated"):
        layer.init(jax.random.PRNGKey(0), x)


def test_native_under_8_device_mesh():
    """Batch split over (data, fsdp): equal to the unsharded native layer, and so is the native
    dense FFN (run in a subprocess: the device count is fixed before jax is imported)."""
    script = os.path.join(os.path.dirname(__file__), "native_moe_sharding_check.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["worst"] < 1e-4, out
    assert "all-to-all" not in out["collectives"], out
    assert out["dense_worst"] < 1e-4, out


@pytest.mark.parametrize("gated, activation, native", [(True, "silu", True),
                                                       (False, "gelu", False)])
def test_auto_is_native_for_swiglu_on_cpu(gated, activation, native):
    """The default ('auto') runs the kernel for SwiGLU experts and the routed path otherwise."""
    cfg = moe_config()
    assert cfg.expert_compute == "auto"
    layer = moe.MoeFeedForward(cfg, 32, activation=activation, gated=gated)
    x = jnp.ones((1, 4, 16))
    params = layer.init(jax.random.PRNGKey(0), x)
    hlo = jax.jit(layer.apply).lower(params, x).as_text()
    assert ("moe_lvlm_experts_forward" in hlo) == native


def test_native_layer_in_bfloat16_computes_in_float32():
    """bf16 activations and weights in, bf16 out: the kernel's float32 result, rounded."""
    cfg = moe_config(expert_compute="native", dispatch="capacity")
    params = random_moe_params(np.random.default_rng(0), 16, 32, 16, cfg.num_experts, True)
    x = np.random.default_rng(1).normal(size=(2, 8, 16)).astype(np.float32)
    x16 = jnp.asarray(x, jnp.bfloat16)
    p16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p16)
    y16 = moe.MoeFeedForward(cfg, 32, dtype=jnp.bfloat16).apply({"params": p16}, x16)[0]
    y32 = moe.MoeFeedForward(cfg, 32).apply({"params": p32}, x16.astype(jnp.float32))[0]
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=2e-2, rtol=1e-2)


def test_auto_without_the_kernel_is_routed(monkeypatch):
    """No compiler (the build warned and returned None): 'auto' runs the routed path."""
    monkeypatch.setattr(native_moe, "available", lambda: False)
    layer = moe.MoeFeedForward(moe_config(), 32)
    x = jnp.ones((1, 4, 16))
    params = layer.init(jax.random.PRNGKey(0), x)
    assert "moe_lvlm_experts" not in jax.jit(layer.apply).lower(params, x).as_text()
