"""The decoder's dense SwiGLU FFN through the native expert kernel (`model.dense_ffn='native'`):
the layer against numpy (float64) and against 'xla' with gradients, the decoder with 'native'
against 'xla', what 'auto' picks, and the config errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from moe_lvlm.config import ConfigError, validate_model
from moe_lvlm.kernels import native_moe
from moe_lvlm.models.decoder import Decoder
from moe_lvlm.models.layers import DenseFeedForward
from moe_lvlm.parallel.mesh import MESH_AXES
from tests.models.fast import fast_jit
from tests.models.test_model_reference import random_params, small_config, text_batch

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not native_moe.available(),
    reason="native kernels are CPU-only and need g++",
)


def np_swiglu(x, gate, up, down, dy):
    """y and (dx, dgate, dup, ddown) of (silu(x Wg) * x Wu) Wd for the cotangent dy; float64."""
    x, gate, up, down, dy = (np.asarray(a, np.float64) for a in (x, gate, up, down, dy))
    g, u = x @ gate, x @ up
    s = 1 / (1 + np.exp(-g))
    h = g * s * u
    dh = dy @ down.T
    dg = dh * u * s * (1 + g * (1 - s))
    du = dh * g * s
    return h @ down, (dg @ gate.T + du @ up.T, x.T @ dg, x.T @ du, h.T @ dy)


def layer_outputs(implementation, x, cot):
    """Parameters, y and (parameter, input) gradients of sum(y * cot) for one DenseFeedForward."""
    layer = DenseFeedForward(64, implementation=implementation)
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x))

    def loss(p, x_):
        y = layer.apply(p, x_)
        return jnp.sum(y * cot), y

    grads, y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return params, y, grads


def test_layer_matches_numpy_and_xla():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 32)).astype(np.float32)  # 21 tokens: not a multiple of the tile
    cot = rng.normal(size=x.shape).astype(np.float32)
    params, y, (gp, gx) = layer_outputs("native", x, cot)
    xla_params, xla_y, (xla_gp, xla_gx) = layer_outputs("xla", x, cot)
    # Same parameter names, shapes and initial values as the XLA layer.
    jax.tree.map(np.testing.assert_array_equal, params, xla_params)
    w = params["params"]
    want_y, (dx, dgate, dup, ddown) = np_swiglu(
        x.reshape(-1, 32), w["gate"]["kernel"], w["up"]["kernel"], w["down"]["kernel"],
        cot.reshape(-1, 32))
    tol = dict(atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), want_y, **tol)
    np.testing.assert_allclose(np.asarray(gx).reshape(-1, 32), dx, **tol)
    for name, want in (("gate", dgate), ("up", dup), ("down", ddown)):
        np.testing.assert_allclose(gp["params"][name]["kernel"], want, **tol, err_msg=name)
    np.testing.assert_allclose(y, xla_y, **tol)
    np.testing.assert_allclose(gx, xla_gx, **tol)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), gp, xla_gp)


def test_decoder_native_matches_xla():
    cfg = small_config(decoder=dict(moe_layers="every_other"))  # layer 1 is dense
    rng = np.random.default_rng(1)
    ids, positions, segment_ids = text_batch(rng, 3, 10, 64, [10, 7, 9])
    cot = rng.normal(size=(3, 10, 64)).astype(np.float32)
    outs = {}
    for choice in ("xla", "native"):
        cfg.dense_ffn = choice
        decoder = Decoder(ml_collections.FrozenConfigDict(cfg), train=True)
        params = random_params(decoder, np.random.default_rng(2), ids, positions, segment_ids)
        assert params["layers_1"]["mlp"]["gate"]["kernel"].shape == (32, 48)

        def loss(p, decoder=decoder):
            logits, _ = decoder.apply({"params": p}, ids, positions, segment_ids)
            return jnp.sum(logits * cot), logits

        grad = jax.grad(loss, has_aux=True)
        # The dense layer's FFN is the kernel's call under 'native' (the MoE layers' experts
        # are under both).
        calls = str(jax.make_jaxpr(grad)(params)).count("moe_lvlm_experts_forward")
        outs[choice] = fast_jit(grad, params)(params), calls
    (g_x, logits_x), calls_x = outs["xla"]
    (g_n, logits_n), calls_n = outs["native"]
    assert calls_n == calls_x + 1
    np.testing.assert_allclose(logits_n, logits_x, atol=1e-4, rtol=1e-4)
    for path, want in jax.tree_util.tree_leaves_with_path(g_x):
        got = dict(jax.tree_util.tree_leaves_with_path(g_n))[path]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=str(path))


def test_auto_picks_native_where_it_can_run():
    def pick(activation="silu", gated=True, use_bias=False, d=32, f=48, out=32, mesh=None):
        return native_moe.resolve_dense_ffn("auto", activation, gated, use_bias, d, f, out, mesh)

    assert pick() == "native"
    assert pick(mesh=AbstractMesh((2, 1, 1, 1), MESH_AXES)) == "native"  # data parallel
    assert pick(mesh=AbstractMesh((1, 1, 1, 2), MESH_AXES)) == "xla"  # tensor parallel
    assert pick(activation="gelu", gated=False, use_bias=True) == "xla"  # the ViT's MLP
    assert pick(d=24) == "xla"
    assert pick(out=16) == "xla"
    assert native_moe.resolve_dense_ffn("xla", "silu", True, False, 32, 48, 32) == "xla"
    with pytest.raises(ValueError, match="dense_ffn='native' cannot run: .*multiples of 16"):
        native_moe.resolve_dense_ffn("native", "silu", True, False, 32, 40, 32)


@pytest.mark.parametrize("decoder, tensor_axis, match", [
    (dict(ffn="mlp", activation="gelu"), 1, "not SwiGLU"),
    (dict(mlp_dim=40), 1, "multiples of 16"),
    ({}, 2, "mesh tensor axis 2"),
])
def test_native_that_cannot_run_is_a_config_error(decoder, tensor_axis, match):
    cfg = small_config(decoder=decoder)
    cfg.dense_ffn = "native"
    with pytest.raises(ConfigError, match=f"dense_ffn='native' cannot run: .*{match}"):
        validate_model(cfg, tensor_axis=tensor_axis)
    cfg.dense_ffn = "auto"
    validate_model(cfg, tensor_axis=tensor_axis)
    cfg.dense_ffn = "fused"
    with pytest.raises(ConfigError, match="model.dense_ffn='fused'"):
        validate_model(cfg)
