"""Upcycling invariant and dispatch equivalence of the MoE FFN.

- Experts that are all copies of one dense FFN give exactly the dense FFN's output whatever the
  router says (the combine weights of the k chosen experts sum to 1).
- `dropless` and `capacity` with a factor that drops nothing (E=4, k=2, factor 2: C = seq) give
  the same outputs, metrics and gradients.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import moe_defaults
from moe_lvlm.models.layers import DenseFeedForward
from moe_lvlm.models.moe import MoeFeedForward
from tests.models import np_reference as ref
from tests.models.fast import fast_jit

BATCH, SEQ, D, HIDDEN, E = 2, 12, 16, 32, 4


def moe_config(dispatch: str):
    cfg = moe_defaults()
    cfg.update(dispatch=dispatch, num_experts=E, top_k=2, capacity_factor_eval=2.0,
               capacity_factor_train=2.0)
    return cfg


def dense_and_moe(gated: bool, dispatch: str):
    activation = "silu" if gated else "gelu"
    dense = DenseFeedForward(HIDDEN, activation=activation, gated=gated, use_bias=not gated)
    layer = MoeFeedForward(moe_config(dispatch), HIDDEN, activation=activation, gated=gated)
    return dense, layer


def random_dense_params(rng, gated):
    def normal(*shape, std=0.3):
        return (std * rng.normal(size=shape)).astype(np.float32)

    if gated:
        return {"gate": {"kernel": normal(D, HIDDEN)}, "up": {"kernel": normal(D, HIDDEN)},
                "down": {"kernel": normal(HIDDEN, D)}}
    return {"fc1": {"kernel": normal(D, HIDDEN), "bias": normal(HIDDEN)},
            "fc2": {"kernel": normal(HIDDEN, D), "bias": normal(D)}}


def upcycled(dense_params, router):
    """The MoE parameters whose E experts are copies of the dense FFN."""
    experts = {}
    for name, p in dense_params.items():
        experts[name] = np.repeat(p["kernel"][None], E, axis=0)
        if "bias" in p:
            experts[f"{name}_bias"] = np.repeat(p["bias"][None], E, axis=0)
    return {"router": router, "experts": experts}


def inputs(rng):
    x = rng.normal(size=(BATCH, SEQ, D)).astype(np.float32)
    valid = np.ones((BATCH, SEQ), bool)
    valid[1, SEQ - 3:] = False
    return x, valid


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("gated", [True, False])
def test_experts_copied_from_dense_ffn_give_the_dense_output(gated, dispatch):
    rng = np.random.default_rng(int(gated) * 2 + (dispatch == "capacity"))
    dense, layer = dense_and_moe(gated, dispatch)
    dense_params = random_dense_params(rng, gated)
    router = (2.0 * rng.normal(size=(D, E))).astype(np.float32)  # confident, varied routing
    x, valid = inputs(rng)
    want = ref.dense_ffn(ref.f64(dense_params), x.astype(np.float64), dense.activation, gated)
    for train in (False, True):
        params = upcycled(dense_params, router)
        apply = fast_jit(
            lambda p, x_, v, t=train: layer.apply({"params": p}, x_, v, train=t), params, x, valid
        )
        y, metrics = apply(params, x, valid)
        np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(want)[valid],
                                   rtol=1e-5, atol=1e-6)
        assert not np.asarray(y)[~valid].any()
        assert float(metrics["dropped_fraction"]) == 0.0
        assert (np.asarray(metrics["expert_fraction"]) > 0).all()  # every expert is used


@pytest.mark.parametrize("gated", [True, False])
def test_dropless_and_capacity_without_drops_agree_with_gradients(gated):
    rng = np.random.default_rng(10 + int(gated))
    x, valid = inputs(rng)
    cotangent = rng.normal(size=(BATCH, SEQ, D)).astype(np.float32)
    layer = dense_and_moe(gated, "dropless")[1]
    shapes = nn.meta.unbox(jax.eval_shape(layer.init, jax.random.key(0), x, valid)["params"])
    params = jax.tree_util.tree_map(  # non-zero biases too
        lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32), shapes
    )

    results = {}
    for dispatch in ("dropless", "capacity"):
        layer = dense_and_moe(gated, dispatch)[1]

        def loss(p, x_, layer=layer):
            y, m = layer.apply({"params": p}, x_, valid, train=True)
            return jnp.sum(y * cotangent) + m["balance_loss"] + m["z_loss"], (y, m)

        value_and_grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (value, (y, metrics)), grads = fast_jit(value_and_grad, params, x)(params, x)
        results[dispatch] = (value, y, metrics, grads)

    (v0, y0, m0, g0), (v1, y1, m1, g1) = results["dropless"], results["capacity"]
    assert float(m1["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for name in m0:
        np.testing.assert_allclose(m1[name], m0[name], rtol=1e-6, err_msg=name)
    flat0 = jax.tree_util.tree_leaves_with_path(g0)
    flat1 = jax.tree_util.tree_leaves(g1)
    for (path, a), b in zip(flat0, flat1, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # The router gets a gradient (through the combine weights and the aux losses).
    assert np.abs(np.asarray(g0[0]["router"])).max() > 1e-4
