"""The fused LM head + cross-entropy kernel (`model.lm_head_loss='native'`): nll, log-sum-exp and
the gradients against numpy (float64) with zero-weight tokens and a vocabulary that is not a
multiple of the kernel's tiles; the training loss with 'native' against 'xla' (untied head with
bias, tied embeddings); what 'auto' picks; the config errors; the 8-device mesh."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lvlm.config import ConfigError, validate_model
from moe_lvlm.kernels import native_lm_loss
from moe_lvlm.models.lvlm import build_model
from moe_lvlm.train.loop import example_inputs
from moe_lvlm.train.step import model_loss
from tests.models.fast import fast_jit

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not native_lm_loss.available(),
    reason="native kernels are CPU-only and need g++",
)


def np_loss(x, head, bias, targets, weights):
    """sum(weights * nll) and its gradients (dx, dhead, dbias); float64."""
    x, head, bias = (np.asarray(a, np.float64) for a in (x, head, bias))
    targets = np.maximum(targets, 0)  # a weight-0 token's target is never read
    logits = x @ head + bias
    top = logits.max(-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    nll = lse - logits[np.arange(len(x)), targets]
    onehot = np.eye(head.shape[1])[targets]
    dlogits = (np.exp(logits - lse[:, None]) - onehot) * weights[:, None]
    return np.sum(weights * nll), (dlogits @ head.T, x.T @ dlogits, dlogits.sum(0))


def problem(rng, n, d, v):
    x = rng.normal(size=(n, d)).astype(np.float32)
    head = (rng.normal(size=(d, v)) * 0.3).astype(np.float32)
    bias = rng.normal(size=v).astype(np.float32)
    targets = rng.integers(0, v, n).astype(np.int32)
    weights = (rng.random(n) * (rng.random(n) > 0.3)).astype(np.float32)  # ~30% zero
    targets[weights == 0] = -1  # never read: a skipped token's target may be anything
    return x, head, bias, targets, weights


@pytest.mark.parametrize("budget", [native_lm_loss.GRAD_BUFFER_BYTES, 0],
                         ids=["per_thread_dw", "dw_split_by_vocab"])
@pytest.mark.parametrize("n, d, v", [(101, 32, 300), (7, 16, 16), (50, 48, 600)])
def test_kernel_matches_numpy(n, d, v, budget):
    """101 tokens (not a multiple of the 48-token tile), V=300 / 600 (not multiples of 16 or the
    256-column chunk), weights 0 (skipped), fractional and 1-ish; a cotangent of 2. Both ways of
    reducing dW: per-thread buffers, and (buffer cap 0) the pass split by vocabulary columns."""
    x, head, bias, targets, weights = problem(np.random.default_rng(n), n, d, v)
    want, (want_dx, want_dhead, want_dbias) = np_loss(x, head, bias, targets, weights)

    def loss(x_, head_, bias_):
        return 2.0 * native_lm_loss.weighted_nll_sum(x_, head_, bias_, targets, weights,
                                                     grad_buffer_bytes=budget)

    value, (dx, dhead, dbias) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
        x, head, bias)
    tol = dict(atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(value, 2 * want, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(loss)(x, head, bias), 2 * want, rtol=1e-5)  # forward only
    np.testing.assert_allclose(dx, 2 * want_dx, **tol)
    assert not np.any(np.asarray(dx)[weights == 0])  # skipped tokens: exactly 0
    np.testing.assert_allclose(dhead, 2 * want_dhead, **tol)
    np.testing.assert_allclose(dbias, 2 * want_dbias, **tol)


@pytest.mark.parametrize("budget", [native_lm_loss.GRAD_BUFFER_BYTES, 0])
def test_without_bias_and_extreme_logits(budget):
    """No bias; logits of +-60 (the log-sum-exp must not overflow); all weights 0 gives 0 and
    zero gradients."""
    x, head, _, targets, weights = problem(np.random.default_rng(1), 30, 16, 40)
    x = x * 40.0
    want, (want_dx, want_dhead, _) = np_loss(x, head, np.zeros(40), targets, weights)

    def loss(x_, head_, w=weights):
        return native_lm_loss.weighted_nll_sum(x_, head_, None, targets, w,
                                               grad_buffer_bytes=budget)

    value, (dx, dhead) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, head)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(dx, want_dx, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dhead, want_dhead, atol=1e-4, rtol=1e-4)
    none, (dx, dhead) = jax.value_and_grad(loss, argnums=(0, 1))(x, head, np.zeros_like(weights))
    assert float(none) == 0.0 and not np.any(dx) and not np.any(dhead)


def test_weighted_target_out_of_range_is_an_error():
    x, head, bias, targets, weights = problem(np.random.default_rng(2), 8, 16, 20)
    weights[:] = 1.0
    targets[3] = 20
    with pytest.raises(Exception, match="target is outside"):
        float(native_lm_loss.weighted_nll_sum(x, head, bias, targets, weights))


TRAIN_FIELDS = [dict(tie_embeddings=False, head_bias=True), dict(tie_embeddings=True)]


@pytest.mark.parametrize("decoder", TRAIN_FIELDS, ids=["untied_bias", "tied"])
def test_training_loss_native_matches_xla(decoder):
    """model_loss and its gradient (every parameter) with the kernel equal the logits path."""
    from tests.train.test_step import make_batch, model_config

    cfg = model_config(moe=False)
    cfg.decoder.update(num_layers=1, **decoder)
    cfg.vision.depth = 1
    batch = make_batch()
    del batch["images"]  # text only: the vision tower's compile time buys nothing here
    outs = {}
    for choice in ("xla", "native"):
        cfg.lm_head_loss = choice
        validate_model(cfg)
        model = build_model(cfg)
        inputs = example_inputs(cfg, 1, batch["input_ids"].shape[1], 1)[:3]  # no vision tower
        params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *inputs)["params"])

        def loss(p, model=model):
            return model_loss(p, batch, jax.random.PRNGKey(1), model=model, moe_cfg=cfg.moe,
                              total_tokens=jnp.sum(batch["loss_mask"]), loss_scale=1.0,
                              packed=False)

        grad = jax.value_and_grad(loss, has_aux=True)
        calls = str(jax.make_jaxpr(grad)(params)).count("moe_lvlm_lm_loss_forward_backward")
        outs[choice] = fast_jit(grad, params)(params), calls
    ((loss_x, metrics_x), g_x), calls_x = outs["xla"]
    ((loss_n, metrics_n), g_n), calls_n = outs["native"]
    assert (calls_x, calls_n) == (0, 1)  # one call: loss and gradients
    np.testing.assert_allclose(loss_n, loss_x, rtol=1e-5)
    np.testing.assert_allclose(metrics_n["ce_sum"], metrics_x["ce_sum"], rtol=1e-5)
    flat_n = dict(jax.tree_util.tree_leaves_with_path(g_n))
    for path, want in jax.tree_util.tree_leaves_with_path(g_x):
        np.testing.assert_allclose(flat_n[path], want, atol=2e-5, rtol=1e-4, err_msg=str(path))


def test_auto_picks_native_where_it_can_run():
    def mesh(size, tensor=1):
        return SimpleNamespace(size=size, shape={"tensor": tensor})

    resolve = native_lm_loss.resolve
    assert resolve("auto", 128) == "native"
    assert resolve("auto", 128, mesh(1)) == "native"
    assert resolve("auto", 128, mesh(8)) == "xla"  # multi-device CPU meshes keep XLA...
    assert resolve("native", 128, mesh(8)) == "native"  # ...unless asked (shard_map)
    assert resolve("auto", 24) == "xla"
    assert resolve("auto", 512) == "native"
    assert resolve("auto", 1024) == "xla"  # XLA's GEMMs are faster for wide heads...
    assert resolve("native", 1024) == "native"  # ...but the kernel runs when asked
    assert resolve("auto", 128, mesh(2, tensor=2)) == "xla"
    assert resolve("xla", 24) == "xla"
    with pytest.raises(ValueError, match="lm_head_loss='native' cannot run: .*multiple of 16"):
        resolve("native", 24)
    with pytest.raises(ValueError, match="lm_head_loss='fused'"):
        resolve("fused", 128)


@pytest.mark.parametrize("embed_dim, tensor_axis, match", [
    (72, 1, "embed_dim=72 must be a multiple of 16"),
    (128, 2, "mesh tensor axis 2"),
])
def test_native_that_cannot_run_is_a_config_error(embed_dim, tensor_axis, match):
    from configs import demo

    cfg = demo.get_config().model
    cfg.decoder.embed_dim = embed_dim
    cfg.lm_head_loss = "native"
    with pytest.raises(ConfigError, match=f"lm_head_loss='native' cannot run: .*{match}"):
        validate_model(cfg, tensor_axis=tensor_axis)
    cfg.lm_head_loss = "auto"
    validate_model(cfg, tensor_axis=tensor_axis)
    cfg.lm_head_loss = "fused"
    with pytest.raises(ConfigError, match="model.lm_head_loss='fused'"):
        validate_model(cfg)


def test_native_under_8_device_mesh():
    """Batch split over (data, fsdp): loss and gradients equal the unsharded kernel's (run in a
    subprocess: the device count is fixed before jax is imported)."""
    script = os.path.join(os.path.dirname(__file__), "native_lm_loss_sharding_check.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["worst"] < 1e-5, out
    assert out["calls"] == 1, out
