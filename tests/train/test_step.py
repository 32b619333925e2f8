"""The train step on a tiny model and a hand-made batch.

- Stage masks: a stage I step changes only the projector; a stage III step changes the
  projector and the FFNs (experts, routers, dense FFNs) and leaves attention, norms,
  embeddings, lm_head and the vision tower bit-identical; frozen parameters have no optimizer
  state.
- The loss is the token-mean cross-entropy over the answer tokens (computed here from the
  logits), the gradient is its gradient, clipped to the global norm `clip_norm`.
- Gradient accumulation over 2 micro-batches gives the full batch's loss and gradient.
- A non-finite loss leaves params, optimizer state and RNG unchanged.
- bf16 compute keeps fp32 parameters and optimizer state and a loss close to fp32's; remat
  gives fp32's loss and gradient.
- The warmup + cosine schedule matches the formula.
"""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo, stages
from moe_lvlm.models.lvlm import build_model
from moe_lvlm.train.loop import state_initializer
from moe_lvlm.train.stages import dense_variant, flatten, unflatten
from moe_lvlm.train.step import make_optimizer, make_schedule, token_cross_entropy, train_step

B, S, IMAGE_TOKENS, IMAGE_ID, LR = 4, 40, 16, 3, 1e-2
# Cheaper CPU code generation (as tests/models/fast.py): compiling dominates these tests.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
STAGE1 = [stages.PROJECTOR]
STAGE3 = [stages.PROJECTOR, stages.DECODER_FFNS]
# What stage III trains in the 2-block decoder (block 0 MoE, block 1 dense), spelled out.
STAGE3_PREFIXES = ("projector/", "decoder/layers_0/moe/", "decoder/layers_1/mlp/")


def model_config(moe: bool = True, **changes):
    cfg = demo.get_config().model
    cfg.decoder.num_layers = 2
    cfg.vision.depth = 2
    cfg.image_token_id = IMAGE_ID
    cfg.moe.update(balance_loss_coef=0.0, z_loss_coef=0.0)
    cfg.update(changes)
    return cfg if moe else dense_variant(cfg)


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of different lengths: BOS, 16 image placeholders, text; the last 8 targets of each
    row are answer tokens."""
    rng = np.random.default_rng(seed)
    batch = {k: np.zeros((B, S), np.int32) for k in ("input_ids", "targets", "segment_ids",
                                                     "positions")}
    batch["loss_mask"] = np.zeros((B, S), np.float32)
    for b in range(B):
        n = S - 3 * b
        ids = np.concatenate([[1], np.full(IMAGE_TOKENS, IMAGE_ID),
                              rng.integers(10, 1000, n - 1 - IMAGE_TOKENS)])
        batch["input_ids"][b, :n] = ids
        batch["targets"][b, :n - 1] = ids[1:]
        batch["loss_mask"][b, n - 9:n - 1] = 1.0
        batch["segment_ids"][b, :n] = 1
        batch["positions"][b, :n] = np.arange(n)
    batch["images"] = rng.normal(size=(B, 1, 32, 32, 3)).astype(np.float32)
    return batch


def fast_jit(fn, *example_args):
    return jax.jit(fn).lower(*example_args).compile(compiler_options=FAST_COMPILE)


def setup(model_cfg, trainable, accum=1, clip_norm=1.0):
    """(initial state, compiled step) for a stage training `trainable`, on batches like
    `make_batch()`."""
    stage = stages.stage(trainable, LR, B, 10, "")
    stage.update(clip_norm=clip_norm, grad_accum=accum)
    model = build_model(model_cfg)
    optimizer = make_optimizer(stage, 10)
    init = state_initializer(model, optimizer, trainable, model_cfg, S, 1)
    state = jax.jit(lambda r: nn.meta.unbox(init(r)))(jax.random.PRNGKey(0))
    step = functools.partial(
        train_step, model=model, moe_cfg=model_cfg.moe, optimizer=optimizer,
        schedule=make_schedule(stage, 10), trainable=tuple(trainable), accum=accum,
    )
    return state, fast_jit(step, state, make_batch())


def host(tree):
    return jax.tree.map(np.asarray, tree)


def adam_mu(opt_state):
    return flatten(optax.tree_utils.tree_get(opt_state, "mu"))


def changed_paths(before, after):
    a, b = flatten(before), flatten(after)
    assert a.keys() == b.keys()
    return {k for k in a if not np.array_equal(a[k], b[k])}


def float_elements(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.fixture(scope="module")
def stage3():
    """Stage III (MoE model, clip_norm 1e-3 so that clipping acts): the state before, after one
    step (lr 0: warmup starts at 0) and after a second one, with their metrics."""
    cfg = model_config()
    state, step = setup(cfg, STAGE3, clip_norm=1e-3)
    batch = make_batch()
    s0 = host(state)
    state, m1 = step(state, batch)
    s1 = host(state)
    state, m2 = step(state, batch)
    return cfg, step, batch, s0, (s1, host(m1)), (host(state), host(m2))


def test_stage1_step_changes_only_the_projector():
    state, step = setup(model_config(moe=False), STAGE1)
    before = host(state)
    for _ in range(2):
        state, metrics = step(state, make_batch())
    params = flatten(before["params"])
    changed = changed_paths(before["params"], host(state["params"]))
    assert changed == {k for k in params if k.startswith("projector/")}
    assert set(adam_mu(state["opt_state"])) == changed
    n_trainable = sum(params[k].size for k in changed)
    assert float_elements(state["opt_state"]) == 2 * n_trainable  # Adam's mu and nu, no more


def test_stage3_step_changes_ffns_and_projector_only(stage3):
    _, _, _, s0, (s1, _), (s2, _) = stage3
    params = flatten(s0["params"])
    assert changed_paths(s0["params"], s1["params"]) == set()  # lr 0 at the first step
    changed = changed_paths(s0["params"], s2["params"])
    assert changed == {k for k in params if k.startswith(STAGE3_PREFIXES)}
    frozen = set(params) - changed
    for part in ("attn/", "norm", "embedding", "lm_head", "vision/", "router"):
        assert any(part in k for k in frozen | changed), part
    assert any(k.startswith("vision/") for k in frozen)
    assert not any(re.search(r"attn/|_norm/|embedding|lm_head|^vision/", k) for k in changed)
    assert any(k.endswith("moe/router") for k in changed)
    assert set(adam_mu(s2["opt_state"])) == changed
    assert float_elements(s2["opt_state"]) == 2 * sum(params[k].size for k in changed)


def reference_loss_and_grads(cfg, params, batch, trainable_prefixes):
    """Token-mean CE over the answer tokens, written here, and its gradient with respect to
    the parameters under `trainable_prefixes`."""
    model = build_model(cfg)
    flat = flatten(params)
    names = [k for k in flat if k.startswith(trainable_prefixes)]

    def loss(train):
        p = {**flat, **dict(zip(names, train, strict=True))}
        logits, _ = model.apply({"params": unflatten(p)}, batch["input_ids"], batch["positions"],
                                batch["segment_ids"], batch["images"], train=True)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["loss_mask"]
        return -jnp.sum(picked * mask) / jnp.sum(mask)

    train = [flat[k] for k in names]
    value, grads = fast_jit(jax.value_and_grad(loss), train)(train)
    return float(value), dict(zip(names, map(np.asarray, grads), strict=True))


def test_loss_is_answer_token_ce_and_gradient_is_clipped_to_the_global_norm(stage3):
    cfg, _, batch, s0, (s1, m1), _ = stage3
    want_loss, grads = reference_loss_and_grads(cfg, s0["params"], batch, STAGE3_PREFIXES)
    assert m1["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert m1["ce"] == pytest.approx(want_loss, rel=1e-5)
    assert m1["loss_tokens"] == 8 * B
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert m1["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert norm > 1e-2  # so that clip_norm=1e-3 scales the gradient down
    mu = adam_mu(s1["opt_state"])
    scale = 1e-3 / norm
    for k, g in grads.items():  # Adam's first moment after one step: (1 - b1) * clipped grad
        np.testing.assert_allclose(mu[k] / 0.1, g * scale, rtol=2e-3, atol=1e-6 * scale, err_msg=k)
    clipped_norm = math.sqrt(sum(float(np.sum((v / 0.1) ** 2)) for v in mu.values()))
    assert clipped_norm == pytest.approx(1e-3, rel=1e-4)


def test_grad_accumulation_matches_the_full_batch(stage3):
    cfg, _, batch, _, (s1, m1), _ = stage3
    state, step = setup(cfg, STAGE3, accum=2, clip_norm=1e-3)
    state, m = step(state, batch)
    assert float(m["loss"]) == pytest.approx(m1["loss"], rel=1e-5)
    assert float(m["grad_norm"]) == pytest.approx(m1["grad_norm"], rel=1e-4)
    want, got = adam_mu(s1["opt_state"]), adam_mu(host(state["opt_state"]))
    scale = max(np.abs(v).max() for v in want.values())
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)


def test_nonfinite_loss_leaves_the_state_unchanged_and_training_continues(stage3):
    _, step, batch, _, _, (s2, _) = stage3
    poisoned = {**batch, "images": np.full_like(batch["images"], np.nan)}
    state, m = step(jax.tree.map(jnp.asarray, s2), poisoned)
    assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
    after = host(state)
    assert int(after["step"]) == int(s2["step"]) + 1
    for part in ("params", "opt_state", "rng"):
        for a, b in zip(jax.tree.leaves(after[part]), jax.tree.leaves(s2[part]), strict=True):
            np.testing.assert_array_equal(a, b)
    state, m = step(state, batch)
    assert int(m["nonfinite"]) == 0
    assert changed_paths(after["params"], host(state["params"]))


def test_bf16_compute_keeps_fp32_master_weights(stage3):
    _, _, batch, _, _, (_, m2) = stage3
    state, step = setup(model_config(dtype="bfloat16"), STAGE3, clip_norm=1e-3)
    for _ in range(2):
        state, m = step(state, batch)
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(adam_mu(state["opt_state"]))} == {
        jnp.dtype("float32")}
    assert float(m["loss"]) == pytest.approx(m2["loss"], rel=2e-2)


def test_remat_gives_the_same_loss_and_gradient(stage3):
    _, _, batch, _, (s1, m1), _ = stage3
    state, step = setup(model_config(remat="full"), STAGE3, clip_norm=1e-3)
    state, m = step(state, batch)
    assert float(m["loss"]) == pytest.approx(m1["loss"], rel=1e-6)
    want, got = adam_mu(s1["opt_state"]), adam_mu(host(state["opt_state"]))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-9, err_msg=k)


def test_warmup_cosine_schedule():
    stage = stages.stage(STAGE1, 2e-3, 8, 100, "")
    stage.update(warmup_fraction=0.1, final_lr_fraction=0.05)
    schedule = make_schedule(stage, 100)
    peak, end = 2e-3, 1e-4
    for t in range(101):
        if t < 10:
            want = peak * t / 10
        else:
            want = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))
        assert float(schedule(t)) == pytest.approx(want, rel=1e-5, abs=1e-10), t


def test_token_cross_entropy_and_its_gradient_match_numpy():
    """The fused loss against float64 numpy: sum of masked -log softmax[target], gradient
    mask * (softmax - onehot(target)); large logits (log-sum-exp must shift) included."""
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(2, 5, 7)) * 30).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5)).astype(np.int32)
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    x = logits.astype(np.float64)
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    onehot = np.eye(7)[targets]
    want = -np.sum(np.log(np.sum(probs * onehot, -1)) * mask)
    loss, grad = jax.value_and_grad(token_cross_entropy)(logits, targets, mask)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, (probs - onehot) * mask[..., None], atol=1e-6)
