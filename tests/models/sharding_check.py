"""Whole-model loss and gradients on 8 fake CPU devices vs one device (run by test_sharding.py).

Run as `python tests/models/sharding_check.py [mode ...]` with modes `capacity`, `dropless`
(dropless expert-parallel dispatch at its CPU default, the buffered all-to-all) or
`dropless:<ep_dispatch>`; it sets XLA_FLAGS itself before importing jax (8 host devices, and
cheaper CPU codegen: compile time dominates). For each mode it computes loss (masked CE + 0.01 *
balance + 0.001 * z-loss) and gradients once without a mesh, then under jit on the meshes below
(only data2_expert4 for `dropless:<ep_dispatch>`) with params and batch sharded by the logical
rules, and prints one line `RESULT {json}` with the worst tolerance ratios (<= 1 passes), whether
each compiled program holds all-to-all / all-gather collectives and the shapes all-gathers
produce, and how the expert kernels are sharded. `dropless:ragged_a2a` is only lowered (XLA:CPU
cannot compile ragged-all-to-all): it reports the collectives of the lowered StableHLO.
"""

import functools
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
]).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import models  # noqa: E402
from moe_lvlm.models.lvlm import build_model, moe_loss_sums  # noqa: E402
from moe_lvlm.models.moe import MoeFeedForward  # noqa: E402
from moe_lvlm.parallel.mesh import (  # noqa: E402
    batch_divisor,
    batch_sharding,
    logical_shardings,
    make_mesh,
    sharding_context,
)

MESHES = {  # sizes over (data, fsdp, expert, tensor)
    "data8": (8, 1, 1, 1),
    "data2_expert4": (2, 1, 4, 1),
    "fsdp2_expert2_tensor2": (1, 2, 2, 2),
}
IMAGE_TOKEN = 3
BATCH, SEQ = 8, 24
RTOL, ATOL = 1e-4, 1e-5


def model_config(dispatch: str, ep_dispatch: str = "auto"):
    cfg = models.tiny()
    # MoE in the decoder's block 0 (SwiGLU experts) and CuMo-style in the projector (GELU experts
    # with biases, the same module as a ViT MoE block); a dense decoder block 1 and ViT block.
    cfg.vision.update(depth=1, select_layer=-1, moe_layers="none")
    cfg.decoder.update(vocab_size=128, num_layers=2, moe_layers="every_other")
    cfg.projector.moe = True
    cfg.moe.update(dispatch=dispatch, ep_dispatch=ep_dispatch, capacity_factor_train=1.0)
    cfg.image_token_id = IMAGE_TOKEN
    return cfg


def make_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows with and without an image, some right-padded."""
    ids = rng.integers(4, 128, (BATCH, SEQ)).astype(np.int32)
    n_img = 16  # (32 / 8) ** 2 patches
    ids[::2, 1 : 1 + n_img] = IMAGE_TOKEN
    segment_ids = np.ones((BATCH, SEQ), np.int32)
    for b, length in enumerate(rng.integers(SEQ - 6, SEQ + 1, BATCH)):
        segment_ids[b, length:] = 0
    ids[segment_ids == 0] = 0
    return dict(
        input_ids=ids,
        positions=np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
        segment_ids=segment_ids,
        images=rng.normal(size=(BATCH, 1, 32, 32, 3)).astype(np.float32),
    )


def random_params(abstract, rng: np.random.Generator):
    """Random values for every parameter: norms near 1, routers large enough to skew routing."""

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return (1 + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
        std = 0.5 if "router" in name else 0.05
        return (std * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def loss_fn(params, batch, model):
    logits, metrics = model.apply(
        {"params": params},
        batch["input_ids"],
        batch["positions"],
        batch["segment_ids"],
        batch["images"],
        train=True,
    )
    targets = batch["input_ids"][:, 1:]
    mask = (batch["segment_ids"][:, 1:] > 0) & (targets != IMAGE_TOKEN)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    ce = jnp.sum(nll * mask) / jnp.sum(mask)
    balance, z = moe_loss_sums(metrics)
    dropped = jnp.stack([m["dropped_fraction"] for m in metrics.values()])
    return ce + 0.01 * balance + 0.001 * z, dropped


def worst_ratio(got, want) -> float:
    """max |got - want| / (ATOL + RTOL |want|) over every leaf."""
    ratios = jax.tree_util.tree_map(
        lambda g, w: float(np.max(np.abs(np.asarray(g) - w) / (ATOL + RTOL * np.abs(w)))),
        got,
        want,
    )
    return max(jax.tree_util.tree_leaves(ratios))


def all_gather_shapes(hlo: str) -> list[str]:
    """Result shapes of the all-gathers in compiled HLO text, e.g. 'f32[4,128,256]'."""
    return sorted(set(re.findall(r"= (\w+\[[\d,]*\])[^=]*? all-gather(?:-start)?\(", hlo)))


def check(mode: str) -> dict:
    assert jax.device_count() == 8, jax.devices()
    dispatch, _, ep_dispatch = mode.partition(":")
    rng = np.random.default_rng(0)
    cfg = model_config(dispatch, ep_dispatch or "auto")
    batch = make_batch(rng)
    single = build_model(cfg)
    abstract = jax.eval_shape(
        single.init,
        jax.random.key(0),
        batch["input_ids"],
        batch["positions"],
        batch["segment_ids"],
        batch["images"],
    )["params"]
    specs = nn.get_partition_spec(abstract)
    params = random_params(nn.meta.unbox(abstract), rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    one = jax.devices()[0]
    (ref_loss, dropped), ref_grads = jax.jit(functools.partial(grad_fn, model=single))(
        jax.device_put(params, one), jax.device_put(batch, one)
    )
    ref_grads = jax.tree_util.tree_map(np.asarray, ref_grads)
    out = {"loss": float(ref_loss), "dropped_fraction": np.asarray(dropped).tolist()}
    meshes = {"data2_expert4": MESHES["data2_expert4"]} if ep_dispatch else MESHES
    for name, shape in meshes.items():
        mesh = make_mesh(shape)
        model = build_model(cfg, mesh)
        with sharding_context(mesh):  # the training loop's
            p = jax.device_put(params, logical_shardings(specs, mesh))
            b = jax.device_put(batch, batch_sharding(mesh))
            lowered = jax.jit(functools.partial(grad_fn, model=model)).lower(p, b)
            if ep_dispatch == "ragged_a2a":
                text = lowered.as_text()
                out[name] = {
                    "ragged_all_to_all": text.count("custom_call @ragged_all_to_all"),
                    "all_gather": "all_gather" in text,
                }
                continue
            constraints = lowered.as_text().count("sdy.sharding_constraint")
            compiled = lowered.compile()
            (loss, _), grads = compiled(p, b)
        hlo = compiled.as_text()
        gate = p["decoder"]["layers_0"]["moe"]["experts"]["gate"]  # [E, d, f]
        out[name] = {
            "loss_ratio": worst_ratio(loss, np.asarray(ref_loss)),
            "grad_ratio": worst_ratio(grads, ref_grads),
            "all_to_all": "all-to-all" in hlo,
            "all_gather": "all-gather" in hlo,
            "all_gather_shapes": all_gather_shapes(hlo),
            "sharding_constraints": constraints,
            "expert_kernel_sharding": str(gate.sharding.spec),
            "expert_kernel_shard_shape": list(gate.addressable_shards[0].data.shape),
        }
    return out


def check_batch_shard() -> dict:
    """moe.capacity_group='batch_shard' (DeepSpeed's per-device routing group): on each mesh the
    capacity MoE layer equals one device's run of it on each batch shard's rows alone. Returns
    the worst tolerance ratio per mesh, and the shards' dropped fractions."""
    rng = np.random.default_rng(1)
    cfg = models.moe_defaults()
    cfg.update(dispatch="capacity", capacity_group="batch_shard", capacity_factor_train=0.75,
               combine_weights="renorm_kept")
    x = (rng.normal(size=(BATCH, SEQ, 16)) + 0.5).astype(np.float32)
    valid = make_batch(rng)["segment_ids"] > 0
    single = MoeFeedForward(cfg, 32)
    params = nn.meta.unbox(single.init(jax.random.key(0), x, valid))
    apply = jax.jit(lambda p, x_, v: single.apply(p, x_, v, train=True))
    out = {}
    for name, shape in MESHES.items():
        mesh = make_mesh(shape)
        rows = BATCH // batch_divisor(mesh)
        parts = [apply(params, x[i:i + rows], valid[i:i + rows]) for i in range(0, BATCH, rows)]
        want = np.concatenate([np.asarray(y) for y, _ in parts])
        layer = MoeFeedForward(cfg, 32, mesh=mesh)
        with sharding_context(mesh):  # the training loop's
            got, _ = jax.jit(lambda p, x_, v, m=layer: m.apply(p, x_, v, train=True))(
                params, jax.device_put(x, batch_sharding(mesh)),
                jax.device_put(valid, batch_sharding(mesh)))
        out[name] = {"ratio": worst_ratio(got, want),
                     "dropped_fraction": [float(m["dropped_fraction"]) for _, m in parts]}
    return out


if __name__ == "__main__":
    modes = sys.argv[1:] or ["capacity", "dropless"]
    checks = {m: functools.partial(check, m) for m in modes}
    if "batch_shard" in modes:
        checks["batch_shard"] = check_batch_shard
    print("RESULT " + json.dumps({m: fn() for m, fn in checks.items()}), flush=True)
