"""MoE routing, dispatch and losses against a plain numpy implementation written here.

The reference follows the text of DESIGN.md section 3 (MoE-LLaVA / DeepSpeed top2gating, GShard
capacity order), loops over tokens in float64, and never calls the code under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import moe_defaults
from moe_lvlm.models import moe

ERF = np.vectorize(math.erf)
ACTIVATIONS = {
    "silu": lambda x: x / (1 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + ERF(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
}


# --------------------------------------------------------------------------- numpy reference
def np_softmax(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def np_route(logits, k, noise=None):
    """Per token: first expert = argmax of logits, later ones = argmax of (logits + noise) over
    the experts not yet taken; weights = their softmax probabilities divided by their sum."""
    probs = np_softmax(logits)
    noisy = logits if noise is None else logits + noise
    ids = np.zeros(logits.shape[:-1] + (k,), np.int64)
    for idx in np.ndindex(*logits.shape[:-1]):
        taken = [int(np.argmax(logits[idx]))]
        for _ in range(1, k):
            scores = noisy[idx].copy()
            scores[taken] = -np.inf
            taken.append(int(np.argmax(scores)))
        ids[idx] = taken
    gates = np.take_along_axis(probs, ids, -1)
    return ids, gates / gates.sum(-1, keepdims=True), probs


def np_slots(ids, valid, num_experts, cap):
    """GShard order per sequence: every first choice in position order, then every second one.
    A pair takes the next free slot of its expert; pairs past `cap` are dropped; padding takes none.
    """
    batch, seq, k = ids.shape
    slot = np.full(ids.shape, -1)
    kept = np.zeros(ids.shape, bool)
    for b in range(batch):
        used = np.zeros(num_experts, int)
        for j in range(k):
            for s in range(seq):
                if not valid[b, s]:
                    continue
                e = ids[b, s, j]
                slot[b, s, j] = used[e]
                kept[b, s, j] = used[e] < cap
                used[e] += 1
    return slot, kept


def np_balance(probs, ids, valid, counts):
    num_experts = probs.shape[-1]
    p = probs[valid].mean(0)
    chosen = ids[valid][:, :1] if counts == "top1" else ids[valid]
    f = np.array([(chosen == e).sum() for e in range(num_experts)]) / chosen.size
    return num_experts * np.sum(f * p)


def np_z_loss(logits, valid):
    m = logits.max(-1)
    lse = m + np.log(np.exp(logits - m[..., None]).sum(-1))
    return np.mean(lse[valid] ** 2)


def np_expert(w, e, x, activation, gated):
    act = ACTIVATIONS[activation]
    if gated:
        return (act(x @ w["gate"][e]) * (x @ w["up"][e])) @ w["down"][e]
    return act(x @ w["fc1"][e] + w["fc1_bias"][e]) @ w["fc2"][e] + w["fc2_bias"][e]


def np_moe(params, x, valid, cfg, activation, gated, factor):
    """Returns (y [B, S, d_out], metrics) of the MoE FFN, factor=None meaning dropless."""
    w = {n: np.asarray(a, np.float64) for n, a in params["experts"].items()}
    x = np.asarray(x, np.float64)
    logits = x @ np.asarray(params["router"], np.float64)
    ids, weights, probs = np_route(logits, cfg.top_k)
    batch, seq, _ = x.shape
    num_experts, k = cfg.num_experts, cfg.top_k
    if factor is None:
        kept = np.broadcast_to(valid[..., None], ids.shape)
    else:
        cap = max(1, math.ceil(k * seq / num_experts * factor))
        kept = np_slots(ids, valid, num_experts, cap)[1]
    d_out = (w["down"] if gated else w["fc2"]).shape[-1]
    y = np.zeros((batch, seq, d_out))
    for b, s, j in np.ndindex(batch, seq, k):
        if kept[b, s, j]:
            y[b, s] += weights[b, s, j] * np_expert(w, ids[b, s, j], x[b, s], activation, gated)
    pairs = valid.sum() * k
    entropy = -(probs * np.log(probs)).sum(-1)
    metrics = {
        "balance_loss": np_balance(probs, ids, valid, cfg.balance_counts),
        "z_loss": np_z_loss(logits, valid),
        "expert_fraction": np.array([(ids[valid] == e).sum() for e in range(num_experts)]) / pairs,
        "dropped_fraction": 1 - kept.sum() / pairs,
        "router_entropy": entropy[valid].mean(),
    }
    return y, metrics


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
    want_ids, want_weights, want_probs = np_route(logits.astype(np.float64), k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


def test_route_second_choice_noise_matches_reference():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, 16, 4)).astype(np.float32)
    key = jax.random.key(7)
    noise = np.asarray(jax.random.gumbel(key, logits.shape, jnp.float32), np.float64)
    ids, weights, _ = moe.route(logits, 2, key)
    want_ids, want_weights, _ = np_route(logits.astype(np.float64), 2, noise)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-6)
    # The noise changes some second choices but never the first.
    clean_ids = np_route(logits.astype(np.float64), 2)[0]
    np.testing.assert_array_equal(np.asarray(ids)[..., 0], clean_ids[..., 0])
    assert (np.asarray(ids)[..., 1] != clean_ids[..., 1]).any()


@pytest.mark.parametrize(
    "seq, num_experts, k, factor, want",
    [(8, 4, 2, 1.5, 6), (5, 4, 2, 1.0, 3), (1, 4, 2, 2.0, 1), (3, 8, 1, 1.0, 1), (24, 4, 2, 2.0, 24)],
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
    want_slot, want_kept = np_slots(ids, valid, num_experts, cap)
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
    ids, _, probs = np_route(logits.astype(np.float64), 2)
    got = moe.balance_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(ids), valid, counts)
    np.testing.assert_allclose(got, np_balance(probs, ids, valid, counts), rtol=1e-5)
    np.testing.assert_allclose(
        moe.z_loss(logits, valid), np_z_loss(logits.astype(np.float64), valid), rtol=1e-5
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
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_layer_matches_reference(case):
    gated, activation, dispatch, train, overrides, shape, shift, seed = CASES[case]
    batch, seq, d_in, hidden, d_out = shape
    cfg = moe_config(dispatch=dispatch, **overrides)
    rng = np.random.default_rng(seed)
    params = random_moe_params(rng, d_in, hidden, d_out, cfg.num_experts, gated)
    x = (rng.normal(size=(batch, seq, d_in)) + shift).astype(np.float32)
    valid = padding_mask(rng, batch, seq)
    layer = moe.MoeFeedForward(cfg, hidden, out_dim=d_out, activation=activation, gated=gated)
    y, metrics = jax.jit(lambda p, x_, v: layer.apply({"params": p}, x_, v, train=train))(
        params, x, valid
    )

    factor = None
    if dispatch == "capacity":
        factor = cfg.capacity_factor_train if train else cfg.capacity_factor_eval
    want_y, want_metrics = np_moe(params, x, valid, cfg, activation, gated, factor)
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
    y, metrics = layer.apply({"params": params}, x)
    first = np.argmax(x[0] @ params["router"], -1)
    keeps = [first[s] not in first[:s] for s in range(6)]
    np.testing.assert_array_equal(np.abs(np.asarray(y)[0]).sum(-1) > 0, keeps)
    np.testing.assert_allclose(metrics["dropped_fraction"], 1 - np.mean(keeps), rtol=1e-6)
