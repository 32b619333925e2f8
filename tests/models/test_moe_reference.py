"""MoE routing, dispatch and losses against a plain numpy implementation written here.

The reference (np_reference.py) follows the text of DESIGN.md section 3 (MoE-LLaVA / DeepSpeed
top2gating, GShard capacity order), loops over tokens in float64, and never calls the code under
test. Gradients are checked against a hand-derived numpy backward pass.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import moe_defaults
from moe_lvlm.models import moe
from tests.models import np_reference as ref
from tests.models.fast import fast_jit


# --------------------------------------------------------------------------- helpers
def moe_config(**overrides):
    cfg = moe_defaults()
    cfg.update(overrides)
    return cfg


def random_moe_params(rng, d_in, hidden, d_out, num_experts, gated, router_std=1.0):
    s_in, s_hidden = 1 / math.sqrt(d_in), 1 / math.sqrt(hidden)
    normal = lambda std, *shape: (std * rng.normal(size=shape)).astype(np.float32)  # noqa: E731
    if gated:
        experts = {
            "gate": normal(s_in, num_experts, d_in, hidden),
            "up": normal(s_in, num_experts, d_in, hidden),
            "down": normal(s_hidden, num_experts, hidden, d_out),
        }
    else:
        experts = {
            "fc1": normal(s_in, num_experts, d_in, hidden),
            "fc1_bias": normal(0.5, num_experts, hidden),
            "fc2": normal(s_hidden, num_experts, hidden, d_out),
            "fc2_bias": normal(0.5, num_experts, d_out),
        }
    return {"router": normal(router_std * s_in, d_in, num_experts), "experts": experts}


def padding_mask(rng, batch, seq):
    """Every row keeps a random-length valid prefix (row 0 is full)."""
    lengths = [seq] + list(rng.integers(seq // 2, seq + 1, batch - 1))
    return np.arange(seq)[None] < np.array(lengths)[:, None]


# --------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("seed, k, num_experts", [(0, 1, 4), (1, 2, 4), (2, 3, 8), (3, 2, 2)])
def test_route_matches_reference(seed, k, num_experts):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, 7, num_experts)).astype(np.float32)
    ids, weights, probs = jax.jit(moe.route, static_argnums=1)(logits, k)
    want_ids, want_weights, want_probs = ref.route(logits.astype(np.float64), k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


def test_route_second_choice_noise_matches_reference():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, 16, 4)).astype(np.float32)
    key = jax.random.key(7)
    noise = np.asarray(jax.random.gumbel(key, logits.shape, jnp.float32), np.float64)
    ids, weights, _ = jax.jit(moe.route, static_argnums=1)(logits, 2, key)
    want_ids, want_weights, _ = ref.route(logits.astype(np.float64), 2, noise)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-6)
    # The noise changes some second choices but never the first.
    clean_ids = ref.route(logits.astype(np.float64), 2)[0]
    np.testing.assert_array_equal(np.asarray(ids)[..., 0], clean_ids[..., 0])
    assert (np.asarray(ids)[..., 1] != clean_ids[..., 1]).any()


@pytest.mark.parametrize(
    "seq, num_experts, k, factor, want",
    [
        (8, 4, 2, 1.5, 6), (5, 4, 2, 1.0, 3), (1, 4, 2, 2.0, 1), (3, 8, 1, 1.0, 1),
        (24, 4, 2, 2.0, 24),
    ],
)
def test_capacity_formula(seq, num_experts, k, factor, want):
    assert moe.capacity(seq, num_experts, k, factor) == want


@pytest.mark.parametrize("seed, k, num_experts, cap", [(0, 2, 4, 3), (1, 1, 4, 2), (2, 3, 8, 2)])
def test_capacity_slots_match_reference(seed, k, num_experts, cap):
    rng = np.random.default_rng(seed)
    batch, seq = 3, 10
    ids = np.stack(
        [rng.permutation(num_experts)[:k] for _ in range(batch * seq)]
    ).reshape(batch, seq, k).astype(np.int32)
    valid = padding_mask(rng, batch, seq)
    valid[2, 3] = False  # a hole in the middle takes no slot either
    slot, kept = jax.jit(moe.capacity_slots, static_argnums=(2, 3))(ids, valid, num_experts, cap)
    want_slot, want_kept = ref.slots(ids, valid, num_experts, cap)
    np.testing.assert_array_equal(kept, want_kept)
    pairs = np.broadcast_to(valid[..., None], ids.shape)
    np.testing.assert_array_equal(np.asarray(slot)[pairs], want_slot[pairs])
    assert not want_kept.all() and want_kept[pairs].any()  # the case really drops some pairs


def test_capacity_slots_hand_example():
    """One sequence, E=2, k=2, cap=2: first choices fill slots before any second choice."""
    ids = np.array([[[0, 1], [0, 1], [0, 1]]], np.int32)
    valid = np.ones((1, 3), bool)
    slot, kept = moe.capacity_slots(ids, valid, 2, 2)
    # Expert 0 gets the first choices of tokens 0 and 1; token 2's first choice is dropped.
    # Expert 1 gets the second choices of tokens 0 and 1; token 2's second choice is dropped.
    np.testing.assert_array_equal(slot, [[[0, 0], [1, 1], [2, 2]]])
    np.testing.assert_array_equal(kept, [[[True, True], [True, True], [False, False]]])


@pytest.mark.parametrize("counts", ["top1", "topk"])
@pytest.mark.parametrize("seed", [0, 1])
def test_balance_and_z_loss_match_reference(counts, seed):
    rng = np.random.default_rng(seed)
    logits = (2 * rng.normal(size=(2, 9, 4))).astype(np.float32)
    valid = padding_mask(rng, 2, 9)
    ids, _, probs = ref.route(logits.astype(np.float64), 2)
    got = jax.jit(moe.balance_loss, static_argnums=3)(
        jnp.asarray(probs, jnp.float32), jnp.asarray(ids), valid, counts
    )
    np.testing.assert_allclose(got, ref.balance_loss(probs, ids, valid, counts), rtol=1e-5)
    np.testing.assert_allclose(
        jax.jit(moe.z_loss)(logits, valid), ref.z_loss(logits.astype(np.float64), valid), rtol=1e-5
    )


def test_balance_loss_is_one_when_perfectly_balanced():
    """Uniform probabilities and every expert equally chosen: E * sum_e (1/E)(1/E) = 1."""
    probs = jnp.full((1, 4, 4), 0.25)
    ids = jnp.array([[[0, 1], [1, 2], [2, 3], [3, 0]]])
    valid = jnp.ones((1, 4), bool)
    for counts in ("top1", "topk"):
        np.testing.assert_allclose(moe.balance_loss(probs, ids, valid, counts), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------- the module
CASES = {
    # name: (gated, activation, dispatch, train, moe overrides, (batch, seq, d_in, hidden, d_out),
    #        x mean shift (skews routing so that capacity drops), seed)
    "swiglu_dropless": (True, "silu", "dropless", False, {}, (2, 8, 16, 32, 16), 0.0, 0),
    "swiglu_capacity_eval": (True, "silu", "capacity", False, {}, (2, 8, 16, 32, 16), 0.0, 1),
    "swiglu_capacity_drops": (
        True, "silu", "capacity", True, dict(capacity_factor_train=1.0), (3, 12, 16, 24, 16),
        1.5, 2,
    ),
    "mlp_dropless_topk_e8_k3": (
        False, "gelu", "dropless", True,
        dict(num_experts=8, top_k=3, balance_counts="topk", capacity_factor_train=1.0),
        (2, 10, 12, 20, 12), 1.0, 3,
    ),
    "mlp_capacity_drops_k1": (
        False, "quick_gelu", "capacity", False,
        dict(top_k=1, capacity_factor_eval=1.0), (2, 9, 12, 20, 12), 1.5, 4,
    ),
    "projector_like_capacity": (
        False, "gelu", "capacity", True, dict(capacity_factor_train=0.75), (2, 8, 12, 24, 24),
        1.0, 5,
    ),
    "swiglu_capacity_drops_renorm_kept": (
        True, "silu", "capacity", True,
        dict(combine_weights="renorm_kept", capacity_factor_train=0.75), (3, 12, 16, 24, 16),
        1.0, 6,
    ),
    "mlp_capacity_drops_batch_shard_min_capacity": (
        False, "gelu", "capacity", False,
        dict(capacity_group="batch_shard", capacity_factor_eval=0.25, min_capacity=5),
        (3, 8, 12, 20, 12), 1.5, 7,
    ),
}


# Both expert computations: routed (the dispatch's gathers, tiled grouped matmul on CPU) and
# dense (every expert on every token, weights zero where not routed or dropped).
COMPUTES = ("routed", "dense")


@pytest.mark.parametrize("compute", COMPUTES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_layer_matches_reference(case, compute):
    gated, activation, dispatch, train, overrides, shape, shift, seed = CASES[case]
    batch, seq, d_in, hidden, d_out = shape
    cfg = moe_config(dispatch=dispatch, expert_compute=compute, **overrides)
    rng = np.random.default_rng(seed)
    params = random_moe_params(rng, d_in, hidden, d_out, cfg.num_experts, gated)
    x = (rng.normal(size=(batch, seq, d_in)) + shift).astype(np.float32)
    valid = padding_mask(rng, batch, seq)
    layer = moe.MoeFeedForward(cfg, hidden, out_dim=d_out, activation=activation, gated=gated)
    apply = fast_jit(
        lambda p, x_, v: layer.apply({"params": p}, x_, v, train=train), params, x, valid
    )
    y, metrics = apply(params, x, valid)

    want_y, want_metrics = ref.moe(params, x, valid, cfg, activation, gated, train)
    np.testing.assert_allclose(y, want_y, rtol=2e-5, atol=2e-5)
    assert not np.asarray(y)[~valid].any()  # padding gets exactly zero
    for name, want in want_metrics.items():
        np.testing.assert_allclose(metrics[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    if case.endswith("drops") or case.startswith("projector"):
        assert want_metrics["dropped_fraction"] > 0.1  # the case exercises dropping
        # Some valid tokens lost every choice: their output is zero, the residual carries them.
        assert (np.abs(want_y[valid]).sum(-1) == 0).any() or cfg.top_k > 1
    if dispatch == "dropless" or case == "swiglu_capacity_eval":
        assert want_metrics["dropped_fraction"] == 0


def test_fully_dropped_token_has_zero_output():
    """k=1, cap=1: only the first token routed to each expert keeps a slot."""
    cfg = moe_config(dispatch="capacity", top_k=1, capacity_factor_eval=0.25)  # cap = 1
    rng = np.random.default_rng(9)
    params = random_moe_params(rng, 8, 16, 8, 4, gated=True)
    x = rng.normal(size=(1, 6, 8)).astype(np.float32)
    layer = moe.MoeFeedForward(cfg, 16)
    y, metrics = fast_jit(layer.apply, {"params": params}, x)({"params": params}, x)
    first = np.argmax(x[0] @ params["router"], -1)
    keeps = [first[s] not in first[:s] for s in range(6)]
    np.testing.assert_array_equal(np.abs(np.asarray(y)[0]).sum(-1) > 0, keeps)
    np.testing.assert_allclose(metrics["dropped_fraction"], 1 - np.mean(keeps), rtol=1e-6)


def test_train_and_eval_use_their_own_capacity_factor():
    """seq 8, E 4, k 2: C = ceil(4 * factor); train factor 0.5 -> C 2 drops, eval 2.0 -> C 8 not."""
    cfg = moe_config(dispatch="capacity", capacity_factor_train=0.5, capacity_factor_eval=2.0)
    rng = np.random.default_rng(11)
    params = random_moe_params(rng, 8, 16, 8, 4, gated=True)
    x = (rng.normal(size=(2, 8, 8)) + 1.0).astype(np.float32)
    layer = moe.MoeFeedForward(cfg, 16)
    ids = ref.route(x.astype(np.float64) @ params["router"], 2)[0]
    valid = np.ones((2, 8), bool)
    for train, cap in ((True, 2), (False, 8)):
        apply = fast_jit(lambda p, x_, t=train: layer.apply({"params": p}, x_, train=t), params, x)
        y, metrics = apply(params, x)
        kept = ref.slots(ids, valid, 4, cap)[1]
        np.testing.assert_allclose(metrics["dropped_fraction"], 1 - kept.mean(), rtol=1e-6)
        np.testing.assert_allclose(
            y, ref.moe(params, x, valid, cfg, "silu", True, train)[0], rtol=2e-5, atol=2e-5
        )
    assert 1 - ref.slots(ids, valid, 4, 2)[1].mean() > 0.2


# --------------------------------------------------------------------------- gradients
def sigmoid(a):
    return 1 / (1 + np.exp(-a))


ACTIVATION_GRADS = {
    "silu": lambda a: sigmoid(a) * (1 + a * (1 - sigmoid(a))),
    "gelu": lambda a: 0.5 * (1 + ref.ERF(a / math.sqrt(2))) + a * np.exp(-a * a / 2) / math.sqrt(
        2 * math.pi
    ),
}


def np_moe_grads(params, x, valid, cotangent, cfg, activation, gated, train):
    """Hand-derived backward pass of sum(moe(x) * cotangent): grads of router, experts and x."""
    w = ref.f64(params["experts"])
    router = np.asarray(params["router"], np.float64)
    x = np.asarray(x, np.float64)
    logits = x @ router
    num_experts, k = cfg.num_experts, cfg.top_k
    mode = ref.combine_mode(cfg)
    ids, weights, probs = ref.route(logits, k, combine=mode)
    if cfg.dispatch == "dropless":
        kept = np.broadcast_to(valid[..., None], ids.shape)
    else:
        kept = ref.capacity_kept(ids, valid, cfg, train)
    if mode == "renorm_kept":
        weights = ref.renorm_kept(weights, kept)
    act, act_grad = ref.ACTIVATIONS[activation], ACTIVATION_GRADS[activation]
    grads = {name: np.zeros_like(a) for name, a in w.items()}
    d_router, dx = np.zeros_like(router), np.zeros_like(x)
    for b, s in np.ndindex(*x.shape[:2]):
        if not valid[b, s]:
            continue
        xt, g = x[b, s], np.asarray(cotangent[b, s], np.float64)
        d_weight = np.zeros(k)
        for j in range(k):
            if not kept[b, s, j]:
                continue
            e = ids[b, s, j]
            if gated:
                a, u = xt @ w["gate"][e], xt @ w["up"][e]
                h = act(a) * u
                out = h @ w["down"][e]
                d_out = weights[b, s, j] * g
                grads["down"][e] += np.outer(h, d_out)
                dh = w["down"][e] @ d_out
                da, du = dh * u * act_grad(a), dh * act(a)
                grads["gate"][e] += np.outer(xt, da)
                grads["up"][e] += np.outer(xt, du)
                dx[b, s] += w["gate"][e] @ da + w["up"][e] @ du
            else:
                a = xt @ w["fc1"][e] + w["fc1_bias"][e]
                h = act(a)
                out = h @ w["fc2"][e] + w["fc2_bias"][e]
                d_out = weights[b, s, j] * g
                grads["fc2"][e] += np.outer(h, d_out)
                grads["fc2_bias"][e] += d_out
                da = (w["fc2"][e] @ d_out) * act_grad(a)
                grads["fc1"][e] += np.outer(xt, da)
                grads["fc1_bias"][e] += da
                dx[b, s] += w["fc1"][e] @ da
            d_weight[j] = g @ out
        # gates = probs[chosen], probs = softmax(logits); weights = gates ('softmax'),
        # gates / sum(gates) ('renorm_chosen'), or over the kept gates only ('renorm_kept').
        gates = probs[b, s, ids[b, s]]
        if mode == "softmax":
            d_gates = d_weight
        else:
            over = kept[b, s] if mode == "renorm_kept" else np.ones(k, bool)
            total = max(gates[over].sum(), 1e-30)
            d_gates = over * (d_weight - np.sum(d_weight * weights[b, s])) / total
        d_probs = np.zeros(num_experts)
        d_probs[ids[b, s]] += d_gates
        d_logits = probs[b, s] * (d_probs - np.sum(probs[b, s] * d_probs))
        d_router += np.outer(xt, d_logits)
        dx[b, s] += router @ d_logits
    return {"router": d_router, "experts": grads}, dx, ids


GRAD_CASES = {
    # name: (gated, activation, dispatch, train, moe overrides, x mean shift, seed)
    "swiglu_dropless_unused_experts": (True, "silu", "dropless", True, dict(num_experts=8), 1.5, 0),
    "swiglu_capacity_no_drops": (True, "silu", "capacity", False, {}, 0.0, 1),
    "swiglu_capacity_drops": (
        True, "silu", "capacity", True, dict(capacity_factor_train=0.75), 1.0, 2
    ),
    "mlp_dropless": (False, "gelu", "dropless", False, dict(top_k=3), 0.0, 3),
    "swiglu_capacity_top1_softmax": (
        True, "silu", "capacity", True, dict(top_k=1, capacity_factor_train=1.0), 1.0, 4
    ),
    "swiglu_capacity_renorm_kept_batch_shard": (
        True, "silu", "capacity", True,
        dict(combine_weights="renorm_kept", capacity_group="batch_shard",
             capacity_factor_train=0.75), 1.0, 5,
    ),
}


@pytest.mark.parametrize("compute", COMPUTES)
@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_moe_gradients_match_hand_derived_backward(case, compute):
    """Grads of sum(y * cotangent) w.r.t. router, experts and x: routed (grouped matmul for
    dropless, gathers for capacity) and dense, with unused experts (empty groups), padding and
    drops."""
    gated, activation, dispatch, train, overrides, shift, seed = GRAD_CASES[case]
    batch, seq, d, hidden = 2, 6, 8, 12
    cfg = moe_config(dispatch=dispatch, expert_compute=compute, **overrides)
    rng = np.random.default_rng(seed)
    params = random_moe_params(rng, d, hidden, d, cfg.num_experts, gated)
    x = (rng.normal(size=(batch, seq, d)) + shift).astype(np.float32)
    valid = padding_mask(rng, batch, seq)
    cotangent = rng.normal(size=(batch, seq, d)).astype(np.float32)
    layer = moe.MoeFeedForward(cfg, hidden, activation=activation, gated=gated)

    def loss(p, x_):
        return jnp.sum(layer.apply({"params": p}, x_, valid, train=train)[0] * cotangent)

    got_params, got_x = fast_jit(jax.grad(loss, argnums=(0, 1)), params, x)(params, x)
    want_params, want_x, ids = np_moe_grads(
        params, x, valid, cotangent, cfg, activation, gated, train
    )
    np.testing.assert_allclose(got_x, want_x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_params["router"], want_params["router"], rtol=1e-4, atol=1e-5)
    for name, want in want_params["experts"].items():
        np.testing.assert_allclose(
            got_params["experts"][name], want, rtol=1e-4, atol=1e-5, err_msg=name
        )
    if case.endswith("unused_experts"):
        unused = set(range(cfg.num_experts)) - set(ids[valid].ravel().tolist())
        assert unused  # empty groups in the ragged matmul
        assert not np.asarray(got_params["experts"]["gate"])[sorted(unused)].any()
