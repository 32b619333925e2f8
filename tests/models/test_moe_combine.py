"""Combine weights, capacity and second-choice noise against hand-computed examples and against a
PyTorch transcription of DeepSpeed's gating (the 0.9.5 release MoE-LLaVA pins), written here.

The transcription follows deepspeed/moe/sharded_moe.py's top1gating (no noisy gate policy, tokens
dropped, random token selection with its uniform draws passed in) and top2gating: one routing
group of S tokens (the flattened micro-batch of one device), capacity ceil(S / E * k * factor) but
at least min_capacity, first choices placed before second choices, combine weights [S, E, C].
Its noise is passed in, so that the same Gumbel sample can be given to both sides.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs.models import moe_defaults, tiny
from moe_lvlm.config import ConfigError, validate_model
from moe_lvlm.models import moe
from tests.models import np_reference as ref
from tests.models.fast import fast_jit
from tests.models.test_moe_reference import random_moe_params


# --------------------------------------------------------------------------- DeepSpeed in torch
def ds_capacity(num_tokens, num_experts, factor, min_capacity):
    cap = math.ceil(num_tokens / num_experts * factor)
    return max(cap, min_capacity)


def ds_top1gating(logits, capacity_factor, min_capacity, uniform=None):
    """(l_aux, combine [S, E, C]): top1gating with noisy_gate_policy=None; use_rts=False, or
    use_rts=True with `uniform` [S, E] as its draw."""
    gates = torch.softmax(logits, dim=1)
    num_experts = gates.shape[1]
    cap = ds_capacity(gates.shape[0], num_experts, capacity_factor, min_capacity)
    first = torch.argmax(gates, dim=1)
    mask1 = torch.nn.functional.one_hot(first, num_experts)
    l_aux = torch.sum(gates.mean(0) * mask1.float().mean(0)) * num_experts
    if uniform is None:
        # Without random token selection the first `cap` tokens (position order) of each expert
        # stay.
        locations1 = torch.cumsum(mask1, dim=0) - 1
        mask1 = mask1 * (locations1 < cap)
    else:  # the `cap` tokens of highest uniform draw stay, then slots in position order
        top_idx = torch.topk(mask1 * uniform, k=min(cap, mask1.shape[0]), dim=0)[1]
        mask1 = mask1 * torch.zeros_like(mask1).scatter_(0, top_idx, 1)
        locations1 = torch.cumsum(mask1, dim=0) - 1
    loc1 = torch.sum(locations1 * mask1, dim=1)
    weights = gates * mask1.float()
    combine = weights[:, :, None] * torch.nn.functional.one_hot(loc1, cap).float()[:, None, :]
    return l_aux, combine


def ds_top2gating(logits, capacity_factor, min_capacity, noise, normalize_before_drop=False):
    """(l_aux, combine [S, E, C]): top2gating with the given second-choice noise. With
    `normalize_before_drop` the two gates are renormalised before the capacity drop (GShard's
    order), else over the kept ones as DeepSpeed does."""
    gates = torch.softmax(logits, dim=1)
    num_experts = gates.shape[1]
    cap = ds_capacity(gates.shape[0], num_experts, 2 * capacity_factor, min_capacity)
    mask1 = torch.nn.functional.one_hot(torch.argmax(gates, dim=1), num_experts)
    noisy = (logits + noise).masked_fill(mask1.bool(), float("-inf"))
    mask2 = torch.nn.functional.one_hot(torch.argmax(noisy, dim=1), num_experts)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(0, keepdim=True)
    l_aux = torch.mean(gates.mean(0) * mask1.float().mean(0)) * num_experts * num_experts
    g1_all, g2_all = (gates * mask1).sum(1), (gates * mask2).sum(1)
    mask1 = mask1 * (locations1 < cap)
    mask2 = mask2 * (locations2 < cap)
    loc1, loc2 = (locations1 * mask1).sum(1), (locations2 * mask2).sum(1)
    g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
    if normalize_before_drop:
        denom = g1_all + g2_all
        g1, g2 = g1_all / denom * mask1.sum(1), g2_all / denom * mask2.sum(1)
    else:
        denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
        g1, g2 = g1 / denom, g2 / denom
    one_hot = torch.nn.functional.one_hot
    combine = (g1[:, None, None] * mask1[:, :, None] * one_hot(loc1, cap)[:, None, :]
               + g2[:, None, None] * mask2[:, :, None] * one_hot(loc2, cap)[:, None, :])
    return l_aux, combine.float()


# --------------------------------------------------------------------------- helpers
def ours_combine(logits, k, factor, min_capacity, mode, key=None, priority=None):
    """Our pure functions on one routing group: (capacity, combine [S, E, C] as numpy)."""
    num_tokens, num_experts = logits.shape
    ids, weights, _ = moe.route(jnp.asarray(logits)[None], k, key, mode)
    cap = moe.capacity(num_tokens, num_experts, k, factor, min_capacity)
    valid = jnp.ones((1, num_tokens), bool)
    slot, kept = moe.capacity_slots(ids, valid, num_experts, cap, priority)
    if mode == "renorm_kept":
        weights = moe.renorm_over_kept(weights, kept)
    combine = np.zeros((num_tokens, num_experts, cap), np.float32)
    ids, slot, kept, weights = (np.asarray(a)[0] for a in (ids, slot, kept, weights))
    for s, j in np.ndindex(num_tokens, k):
        if kept[s, j]:
            combine[s, ids[s, j], slot[s, j]] = weights[s, j]
    return cap, combine


def one_hot_expert_params(probs, num_experts):
    """A layer whose router logits are log(probs) for inputs x = log(probs) (identity router) and
    whose expert e outputs the unit vector e: y[token] is then its combine weight per expert."""
    eye = np.eye(num_experts, dtype=np.float32)
    zeros = np.zeros
    return {
        "router": eye,
        "experts": {
            "fc1": zeros((num_experts, num_experts, 4), np.float32),
            "fc1_bias": zeros((num_experts, 4), np.float32),
            "fc2": zeros((num_experts, 4, num_experts), np.float32),
            "fc2_bias": eye,
        },
    }, np.log(np.asarray(probs, np.float32))[None]


def layer_weights(probs, rngs=None, **overrides):
    """Per token and expert, the weight the MoE layer gives that expert's output."""
    probs = np.asarray(probs, np.float32)
    num_experts = probs.shape[-1]
    cfg = moe_defaults()
    cfg.update(num_experts=num_experts, dispatch="capacity", capacity_group="batch_shard",
               **overrides)
    params, x = one_hot_expert_params(probs, num_experts)
    layer = moe.MoeFeedForward(cfg, 4, activation="gelu", gated=False)
    y, metrics = layer.apply({"params": params}, x, train=True, rngs=rngs)
    return np.asarray(y)[0], metrics


# --------------------------------------------------------------------------- hand examples
# Three tokens, E=3, k=2, capacity 2 (factor 1): all first choices are expert 0, so token 2's
# first choice is dropped; the second choices (1, 2, 1) all fit.
PROBS_3 = [[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.7, 0.2, 0.1]]
HAND_3 = {
    "softmax": [[0.5, 0.3, 0], [0.6, 0, 0.3], [0, 0.2, 0]],
    "renorm_chosen": [[0.5 / 0.8, 0.3 / 0.8, 0], [0.6 / 0.9, 0, 0.3 / 0.9], [0, 0.2 / 0.9, 0]],
    "renorm_kept": [[0.5 / 0.8, 0.3 / 0.8, 0], [0.6 / 0.9, 0, 0.3 / 0.9], [0, 1.0, 0]],
}
# Two tokens, E=3, k=2, capacity 1 (factor 0.5): token 0 takes expert 0 then 1, token 1 takes 1
# then 0. First choices fill both slots, so both second choices are dropped.
PROBS_2 = [[0.6, 0.3, 0.1], [0.35, 0.55, 0.1]]
HAND_2 = {
    "softmax": [[0.6, 0, 0], [0, 0.55, 0]],
    "renorm_chosen": [[0.6 / 0.9, 0, 0], [0, 0.55 / 0.9, 0]],
    "renorm_kept": [[1.0, 0, 0], [0, 1.0, 0]],
}


@pytest.mark.parametrize("mode", sorted(HAND_3))
def test_hand_example_first_choice_dropped(mode):
    got, metrics = layer_weights(PROBS_3, top_k=2, combine_weights=mode, capacity_factor_train=1.0)
    np.testing.assert_allclose(got, HAND_3[mode], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["dropped_fraction"], 1 / 6, rtol=1e-6)


@pytest.mark.parametrize("mode", sorted(HAND_2))
def test_hand_example_second_choice_dropped(mode):
    """renorm_kept (DeepSpeed top2gating) gives weight 1.0 to a token whose second choice was
    dropped; GShard's renorm_chosen keeps p1 / (p1 + p2)."""
    got, _ = layer_weights(PROBS_2, top_k=2, combine_weights=mode, capacity_factor_train=0.5)
    np.testing.assert_allclose(got, HAND_2[mode], rtol=1e-5, atol=1e-6)


def test_hand_example_top1_auto_is_softmax():
    got, _ = layer_weights(PROBS_3, top_k=1, capacity_factor_train=1.0)  # capacity 1
    np.testing.assert_allclose(got, [[0.5, 0, 0], [0, 0, 0], [0, 0, 0]], rtol=1e-5, atol=1e-6)


def test_hand_example_min_capacity():
    """Capacity ceil(2 / 3 * 2 * 0.5) = 1 drops both second choices; min_capacity 2 keeps them."""
    got, metrics = layer_weights(PROBS_2, top_k=2, combine_weights="renorm_kept",
                                 capacity_factor_train=0.5, min_capacity=2)
    np.testing.assert_allclose(got, [[0.6 / 0.9, 0.3 / 0.9, 0], [0.35 / 0.9, 0.55 / 0.9, 0]],
                               rtol=1e-5, atol=1e-6)
    assert metrics["dropped_fraction"] == 0


@pytest.mark.parametrize(
    "tokens, num_experts, k, factor, min_capacity, want",
    [(16, 4, 2, 1.5, 0, 12), (16, 4, 1, 1.0, 8, 8), (3, 4, 2, 1.0, 0, 2), (2, 4, 1, 1.0, 0, 1),
     (2048, 4, 2, 2.0, 4, 2048)],
)
def test_capacity_formula_hand(tokens, num_experts, k, factor, min_capacity, want):
    assert moe.capacity(tokens, num_experts, k, factor, min_capacity) == want


# --------------------------------------------------------------------------- vs DeepSpeed
def skewed_logits(seed, tokens, num_experts, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = scale * rng.normal(size=(tokens, num_experts)) + np.linspace(1, 0, num_experts)
    return logits.astype(np.float32)


@pytest.mark.parametrize("factor, min_capacity", [(1.0, 0), (0.5, 0), (0.25, 6)])
def test_top1_softmax_matches_deepspeed_top1gating(factor, min_capacity):
    logits = skewed_logits(0, 24, 4)
    l_aux, want = ds_top1gating(torch.from_numpy(logits), factor, min_capacity)
    cap, got = ours_combine(logits, 1, factor, min_capacity, "softmax")
    assert cap == want.shape[-1]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7)
    ids, _, probs = moe.route(jnp.asarray(logits), 1)
    ours_aux = moe.balance_loss(probs, ids, jnp.ones(24, bool), "top1")
    np.testing.assert_allclose(ours_aux, l_aux.item(), rtol=1e-5)
    assert (want.sum((1, 2)) == 0).any() or factor == 1.0  # some tokens are dropped


@pytest.mark.parametrize("factor, min_capacity", [(0.5, 0), (0.25, 6)])
def test_top1_random_drop_policy_matches_deepspeed_use_rts(factor, min_capacity):
    """drop_policy='random' is top1gating's use_rts given the same uniform draws: which tokens
    keep an over-full expert's slots (their slot order may differ: both fill C unique slots)."""
    logits = skewed_logits(0, 24, 4)
    priority = jax.random.uniform(jax.random.key(4), (1, 24, 1))
    uniform = np.repeat(np.asarray(priority)[0], 4, axis=1)  # DeepSpeed draws [S, E]
    _, want = ds_top1gating(torch.from_numpy(logits), factor, min_capacity,
                            torch.from_numpy(uniform))
    cap, got = ours_combine(logits, 1, factor, min_capacity, "softmax", priority=priority)
    assert cap == want.shape[-1]
    np.testing.assert_allclose(got.sum(-1), want.numpy().sum(-1), rtol=1e-6, atol=1e-7)
    assert ((got > 0).sum(0) <= 1).all()  # one token per slot
    _, by_position = ours_combine(logits, 1, factor, min_capacity, "softmax")
    assert not np.array_equal(got.sum(-1) > 0, by_position.sum(-1) > 0)  # another subset kept


def test_random_drop_policy_hand_example():
    """Top-1, E=2, cap 2: the four tokens all choose expert 0; the two of highest priority stay.
    Top-2: choice rounds keep their order (a second choice never takes a first choice's slot),
    priority orders the pairs within a round."""
    slot, kept = moe.capacity_slots(np.zeros((1, 4, 1), np.int32), np.ones((1, 4), bool), 2, 2,
                                    jnp.asarray([[[0.1], [0.9], [0.3], [0.5]]]))
    np.testing.assert_array_equal(slot[0, :, 0], [3, 0, 2, 1])
    np.testing.assert_array_equal(kept[0, :, 0], [False, True, False, True])
    ids = np.array([[[0, 1], [0, 1], [1, 0]]], np.int32)
    priority = jnp.asarray([[[0.2, 0.9], [0.8, 0.1], [0.5, 0.4]]])
    slot, kept = moe.capacity_slots(ids, np.ones((1, 3), bool), 2, 2, priority)
    # Round 1: expert 0 takes token 1 then token 0, expert 1 token 2. Round 2: expert 1 takes
    # token 0 (priority 0.9) into its last slot, token 1 is dropped; expert 0 is full (token 2).
    np.testing.assert_array_equal(slot, [[[1, 1], [0, 2], [0, 2]]])
    np.testing.assert_array_equal(kept, [[[True, True], [True, False], [True, False]]])


def test_layer_random_drop_policy():
    """In the layer: each over-full expert keeps exactly C tokens, a subset that changes with
    the 'router' rng; without one (evaluation) the subset is fixed per layer."""
    probs = [[0.7, 0.2, 0.1]] * 6 + [[0.1, 0.8, 0.1]] * 2  # capacity ceil(8 / 3 * 0.75) = 2
    overrides = dict(top_k=1, drop_policy="random", capacity_factor_train=0.75)
    subsets = set()
    for seed in range(4):
        got, _ = layer_weights(probs, rngs={"router": jax.random.key(seed)}, **overrides)
        kept = got.sum(-1) > 0
        assert kept[:6].sum() == 2 and kept[6:].all()
        np.testing.assert_allclose(got[kept].max(-1), [0.7, 0.7, 0.8, 0.8], rtol=1e-5)
        subsets.add(tuple(np.flatnonzero(kept[:6])))
    assert len(subsets) > 1
    fixed = [layer_weights(probs, **overrides)[0] for _ in range(2)]
    np.testing.assert_array_equal(*fixed)


@pytest.mark.parametrize("mode", ["renorm_kept", "renorm_chosen"])
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("factor, min_capacity", [(1.0, 0), (0.5, 0), (0.3, 9)])
def test_top2_matches_deepspeed_top2gating(mode, noisy, factor, min_capacity):
    """renorm_kept is DeepSpeed's top2gating; renorm_chosen the same with the two gates
    renormalised before the drop. With `noisy` both get the same Gumbel sample."""
    logits = skewed_logits(1, 32, 4)
    key = jax.random.key(3) if noisy else None
    noise = np.zeros_like(logits)
    if noisy:  # what moe.route draws for logits of shape [1, S, E]
        noise = np.array(jax.random.gumbel(key, (1, *logits.shape), jnp.float32)[0])
    l_aux, want = ds_top2gating(torch.from_numpy(logits), factor, min_capacity,
                                torch.from_numpy(noise), mode == "renorm_chosen")
    cap, got = ours_combine(logits, 2, factor, min_capacity, mode, key)
    assert cap == want.shape[-1]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    ids, _, probs = moe.route(jnp.asarray(logits), 2)
    ours_aux = moe.balance_loss(probs, ids, jnp.ones(32, bool), "top1")
    np.testing.assert_allclose(ours_aux, l_aux.item(), rtol=1e-5)
    if factor < 1:  # the case exercises second choices dropped while the first is kept
        kept_per_token = (want.numpy() > 0).sum((1, 2))
        assert (kept_per_token == 1).any()


def ds_layer_output(params, x, gating):
    """DeepSpeed's MoE layer output for tokens x [S, d]: dispatch by the combine tensor's mask,
    every expert on its slots, combine. The experts are the numpy reference's."""
    w = ref.f64(params["experts"])
    logits = torch.from_numpy(np.asarray(x, np.float64) @ np.asarray(params["router"], np.float64))
    l_aux, combine = gating(logits)
    combine = combine.numpy().astype(np.float64)
    dispatched = np.einsum("sec,sm->ecm", (combine > 0).astype(np.float64), x)
    out = np.stack([ref.expert_ffn(w, e, dispatched[e], "silu", True)
                    for e in range(combine.shape[1])])
    return np.einsum("sec,ecm->sm", combine, out), l_aux.item()


@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_matches_deepspeed_layer(top_k):
    """The MoE-LLaVA preset's routing (one group per batch shard, DeepSpeed's capacity and
    combine weights) run as a layer on a [2, 12] batch equals DeepSpeed's layer on the 24
    flattened tokens."""
    cfg = moe_defaults()
    combine = "softmax" if top_k == 1 else "renorm_kept"
    cfg.update(top_k=top_k, dispatch="capacity", capacity_group="batch_shard",
               combine_weights=combine, capacity_factor_eval=0.75, min_capacity=2)
    rng = np.random.default_rng(7)
    params = random_moe_params(rng, 8, 16, 8, 4, gated=True)
    x = (rng.normal(size=(2, 12, 8)) + 0.5).astype(np.float32)
    layer = moe.MoeFeedForward(cfg, 16)
    y, metrics = fast_jit(lambda p, x_: layer.apply({"params": p}, x_), params, x)(params, x)
    if top_k == 1:
        gating = lambda lg: ds_top1gating(lg, 0.75, 2)  # noqa: E731
    else:
        gating = lambda lg: ds_top2gating(lg, 0.75, 2, torch.zeros_like(lg))  # noqa: E731
    want, l_aux = ds_layer_output(params, x.reshape(24, 8).astype(np.float64), gating)
    np.testing.assert_allclose(np.asarray(y).reshape(24, 8), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(metrics["balance_loss"], l_aux, rtol=1e-5)
    assert metrics["dropped_fraction"] > 0


# --------------------------------------------------------------------------- top-1 learns
def test_top1_router_gradient_is_nonzero_and_matches_finite_differences():
    """With softmax combine weights the router of a top-1 layer gets a gradient from the output
    (renormalising would make every weight 1), equal to central finite differences."""
    cfg = moe_defaults()
    cfg.update(top_k=1, dispatch="dropless")
    rng = np.random.default_rng(11)
    params = random_moe_params(rng, 6, 12, 6, 4, gated=True)
    x = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    cotangent = rng.normal(size=(2, 5, 6)).astype(np.float32)
    layer = moe.MoeFeedForward(cfg, 12)

    def loss(router):
        p = {**params, "router": router}
        return jnp.sum(layer.apply({"params": p}, x)[0] * cotangent)

    router = jnp.asarray(params["router"])
    grad = np.asarray(jax.jit(jax.grad(loss))(router))
    assert np.abs(grad).max() > 1e-2
    eps = 1e-3
    loss_jit = jax.jit(loss)
    fd = np.zeros_like(grad)
    for i, j in np.ndindex(*grad.shape):
        step = np.zeros(grad.shape, np.float32)
        step[i, j] = eps
        fd[i, j] = (float(loss_jit(router + step)) - float(loss_jit(router - step))) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=2e-3)


def test_top1_with_renormalised_weights_is_rejected():
    cfg = tiny()
    cfg.moe.update(top_k=1, combine_weights="renorm_kept")
    with pytest.raises(ConfigError, match="combine_weights='renorm_kept' with top_k=1"):
        validate_model(cfg)
    cfg.moe.combine_weights = "gshard"
    with pytest.raises(ConfigError, match="combine_weights='gshard'"):
        validate_model(cfg)


# --------------------------------------------------------------------------- noise modes
@pytest.mark.parametrize("mode, train, noisy", [
    ("none", True, False), ("train", True, True), ("train", False, False),
    ("always", True, True), ("always", False, True),
])
def test_second_choice_noise_modes(mode, train, noisy):
    """'always' draws the second choice with noise outside training too (DeepSpeed 0.9.5 applies
    it on every top2gating call), from a fixed key when no 'router' rng is given."""
    cfg = moe_defaults()
    cfg.update(second_choice_noise=mode, dispatch="dropless")
    rng = np.random.default_rng(2)
    params = random_moe_params(rng, 8, 8, 8, 4, gated=True, router_std=0.3)
    x = rng.normal(size=(2, 64, 8)).astype(np.float32)
    layer = moe.MoeFeedForward(cfg, 8)
    rngs = {"router": jax.random.key(5)} if train else {}
    _, state = layer.apply({"params": params}, x, train=train, rngs=rngs,
                           mutable=["intermediates"])
    ids = np.asarray(state["intermediates"]["expert_ids"][0])
    clean = ref.route(x.astype(np.float64) @ params["router"], 2)[0]
    np.testing.assert_array_equal(ids[..., 0], clean[..., 0])
    assert (ids[..., 1] != clean[..., 1]).any() == noisy
