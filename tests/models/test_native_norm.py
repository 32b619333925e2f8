"""The native RMSNorm kernel (`model.rms_norm='native'`): forward and both gradients against a
float64 numpy reference with a hand-derived backward, odd shapes, bf16, the decoder with
'native' against 'xla', an 8-device mesh, what 'auto' picks, and the config errors."""

import json
import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_lvlm.config import ConfigError, validate_model
from moe_lvlm.kernels import native_norm
from moe_lvlm.models.decoder import Decoder
from moe_lvlm.models.layers import RMSNorm
from tests.models.fast import fast_jit
from tests.models.test_model_reference import random_params, small_config, text_batch

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not native_norm.available(),
    reason="native kernels are CPU-only and need g++",
)


def np_rms_norm(x, scale, dy, eps):
    """y, dx, dscale of x / sqrt(mean(x^2) + eps) * scale for the cotangent dy, in float64:
    with r = (mean(x^2) + eps)^-1/2, dr/dx_j = -r^3 x_j / d, so
    dx_j = r scale_j dy_j - r^3 x_j sum_i(dy_i scale_i x_i) / d."""
    x, scale, dy = (np.asarray(a, np.float64) for a in (x, scale, dy))
    d = x.shape[-1]
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    g = dy * scale
    dx = r * g - r**3 * x * np.sum(g * x, axis=-1, keepdims=True) / d
    dscale = np.sum((dy * x * r).reshape(-1, d), axis=0)
    return x * r * scale, dx, dscale


def layer_outputs(implementation, x, cot, dtype=jnp.float32, eps=1e-6):
    """y and the (scale, x) gradients of sum(y * cot) for one RMSNorm with a random scale."""
    layer = RMSNorm(eps, dtype=dtype, implementation=implementation)
    scale = np.random.default_rng(7).normal(size=x.shape[-1]).astype(np.float32)
    params = {"params": {"scale": scale}}

    def loss(p, x_):
        y = layer.apply(p, x_)
        return jnp.sum(y.astype(jnp.float32) * cot), y

    (gp, gx), y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return scale, y, gp["params"]["scale"], gx


@pytest.mark.parametrize("shape", [(3, 7, 32), (5, 13), (2, 17, 8), (1, 1), (4, 3, 2, 130)])
def test_layer_matches_numpy(shape):
    """Multiples of 8 and not (13, 130: the scalar tail), row counts below, at and above a task
    (2 x 17 = 34 rows, 24 rows), a single element."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 3).astype(np.float32)
    cot = rng.normal(size=shape).astype(np.float32)
    scale, y, dscale, dx = layer_outputs("native", x, cot, eps=1e-5)
    want_y, want_dx, want_dscale = np_rms_norm(x, scale, cot, 1e-5)
    tol = dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(y, want_y, **tol)
    np.testing.assert_allclose(dx, want_dx, **tol)
    np.testing.assert_allclose(dscale, want_dscale, atol=1e-4, rtol=1e-5)


def test_several_tasks_match_numpy_and_are_deterministic():
    """1.1M elements: four tasks of the kernel (dscale summed over their partial sums), 275 rows
    each, d = 1001; two calls give the same bits."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1100, 1001)).astype(np.float32)
    cot = rng.normal(size=x.shape).astype(np.float32)
    scale, y, dscale, dx = layer_outputs("native", x, cot)
    want_y, want_dx, want_dscale = np_rms_norm(x, scale, cot, 1e-6)
    np.testing.assert_allclose(y, want_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dx, want_dx, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dscale, want_dscale, atol=1e-3, rtol=1e-5)
    again = layer_outputs("native", x, cot)
    np.testing.assert_array_equal(again[2], dscale)
    np.testing.assert_array_equal(again[3], dx)


def test_bf16_in_and_out():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, 9, 48)), jnp.bfloat16)
    cot = rng.normal(size=x.shape).astype(np.float32)
    scale, y, dscale, dx = layer_outputs("native", x, cot, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    dy = np.asarray(jnp.asarray(cot, jnp.bfloat16), np.float32)  # y's cotangent is bf16
    want_y, want_dx, want_dscale = np_rms_norm(np.asarray(x, np.float32), scale, dy, 1e-6)
    np.testing.assert_allclose(np.asarray(y, np.float32), want_y, atol=3e-2, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(dx, np.float32), want_dx, atol=3e-2, rtol=1e-2)
    np.testing.assert_allclose(dscale, want_dscale, atol=1e-3, rtol=1e-4)


def test_decoder_native_matches_xla():
    cfg = small_config(decoder=dict(moe_layers="none", num_layers=2))
    rng = np.random.default_rng(3)
    ids, positions, segment_ids = text_batch(rng, 3, 10, 64, [10, 7, 9])
    cot = rng.normal(size=(3, 10, 64)).astype(np.float32)
    outs = {}
    for choice in ("xla", "native"):
        cfg.rms_norm = choice
        decoder = Decoder(ml_collections.FrozenConfigDict(cfg), train=True)
        params = random_params(decoder, np.random.default_rng(4), ids, positions, segment_ids)
        assert params["layers_1"]["ffn_norm"]["scale"].shape == (32,)

        def loss(p, decoder=decoder):
            logits, _ = decoder.apply({"params": p}, ids, positions, segment_ids)
            return jnp.sum(logits * cot), logits

        grad = jax.grad(loss, has_aux=True)
        calls = str(jax.make_jaxpr(grad)(params)).count("moe_lvlm_rms_norm_backward")
        outs[choice] = fast_jit(grad, params)(params), calls
    (g_x, logits_x), calls_x = outs["xla"]
    (g_n, logits_n), calls_n = outs["native"]
    assert (calls_x, calls_n) == (0, 5)  # two norms a layer and the final one
    np.testing.assert_allclose(logits_n, logits_x, atol=1e-4, rtol=1e-4)
    got = dict(jax.tree_util.tree_leaves_with_path(g_n))
    for path, want in jax.tree_util.tree_leaves_with_path(g_x):
        np.testing.assert_allclose(got[path], want, atol=1e-4, rtol=1e-4, err_msg=str(path))


def test_mesh_matches_no_mesh():
    """Batch over (data 2, fsdp 2, tensor 2) on 8 fake devices (a subprocess: the device count
    is fixed before jax is imported)."""
    script = os.path.join(os.path.dirname(__file__), "native_norm_sharding_check.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["worst"] < 1e-5, out
    assert out["calls"] > 0, out
    assert "all-gather" not in out["collectives"], out


def test_auto_resolution(monkeypatch):
    assert native_norm.resolve("auto") == "native"
    assert native_norm.resolve("xla") == "xla"
    one, eight = types.SimpleNamespace(size=1), types.SimpleNamespace(size=8)
    assert native_norm.resolve("auto", one) == "native"
    assert native_norm.resolve("auto", eight) == "xla"  # test meshes keep XLA's sharded norm
    assert native_norm.resolve("native", eight) == "native"
    with pytest.raises(ValueError, match="model.rms_norm='fused'"):
        native_norm.resolve("fused")
    monkeypatch.setattr(native_norm, "available", lambda: False)
    assert native_norm.resolve("auto") == "xla"
    with pytest.raises(ValueError, match="rms_norm='native' cannot run: the kernel is unavail"):
        native_norm.resolve("native")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert native_norm.resolve("auto") == "xla"
    with pytest.raises(ValueError, match="rms_norm='native' cannot run: the backend is gpu"):
        native_norm.resolve("native")


def test_layer_auto_uses_the_kernel():
    x = jnp.ones((2, 3, 16))
    layer = RMSNorm(implementation="auto")
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x))
    assert "moe_lvlm_rms_norm_forward" in str(jax.make_jaxpr(layer.apply)(params, x))


def test_config_errors(monkeypatch):
    cfg = small_config()
    for choice in ("auto", "xla", "native"):
        cfg.rms_norm = choice
        validate_model(cfg)
    cfg.rms_norm = "fused"
    with pytest.raises(ConfigError, match="model.rms_norm='fused': use one of"):
        validate_model(cfg)
    cfg.rms_norm = "native"
    cfg.decoder.norm = "layer"
    with pytest.raises(ConfigError, match="rms_norm='native' cannot run: .*LayerNorm"):
        validate_model(cfg)
    cfg.decoder.norm = "rms"
    monkeypatch.setattr(native_norm, "available", lambda: False)
    with pytest.raises(ConfigError, match="rms_norm='native' cannot run: the kernel is unavail"):
        validate_model(cfg)
