"""Start-up validation: every unworkable config raises one ConfigError naming what to change; the
presets are valid and have the documented shapes."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import base, models
from moe_lvlm.config import ConfigError, moe_layer_indices, num_image_tokens, validate
from moe_lvlm.models.decoder import Decoder
from moe_lvlm.models.lvlm import build_model
from moe_lvlm.parallel.mesh import make_mesh


def run_config(**mesh) -> ml_collections.ConfigDict:
    cfg = base.get_base_config()
    cfg.mesh.update(mesh)
    return cfg


BAD = {
    # name: (edit of the config, device count, words the message must contain)
    "top_k_above_experts": (
        lambda c: c.model.moe.update(top_k=5), 8,
        ["model.moe.top_k=5", "model.moe.num_experts=4"],
    ),
    "top_k_zero": (lambda c: c.model.moe.update(top_k=0), 8, ["model.moe.top_k=0"]),
    "experts_not_divisible": (
        lambda c: (c.model.moe.update(num_experts=6), c.mesh.update(data=2, expert=4)), 8,
        ["num_experts=6 is not divisible by mesh expert axis 4"],
    ),
    "experts_not_divisible_rest_axis": (
        lambda c: (c.model.moe.update(num_experts=4), c.mesh.update(data=1, expert=-1)), 8,
        ["num_experts=4 is not divisible by mesh expert axis 8"],
    ),
    "mesh_larger_than_devices": (
        lambda c: c.mesh.update(data=4, fsdp=4), 8, ["16 devices but 8 are available"],
    ),
    "mesh_smaller_than_devices": (
        lambda c: c.mesh.update(data=2, fsdp=2), 8, ["4 devices but 8 are available"],
    ),
    "fixed_axes_do_not_divide": (
        lambda c: c.mesh.update(data=-1, tensor=3), 8, ["multiply to 3", "8 devices"],
    ),
    "two_rest_axes": (lambda c: c.mesh.update(data=-1, fsdp=-1), 8, ["['data', 'fsdp']"]),
    "zero_axis": (lambda c: c.mesh.update(tensor=0), 8, ["tensor=0"]),
    "unknown_dispatch": (
        lambda c: c.model.moe.update(dispatch="sinkhorn"), 1,
        ["model.moe.dispatch='sinkhorn'", "dropless", "capacity"],
    ),
    "unknown_ep_dispatch": (
        lambda c: c.model.moe.update(ep_dispatch="nccl"), 1,
        ["model.moe.ep_dispatch='nccl'", "ragged_a2a", "a2a_buffer", "all_gather"],
    ),
    "unknown_expert_compute": (
        lambda c: c.model.moe.update(expert_compute="sparse"), 1,
        ["model.moe.expert_compute='sparse'", "routed", "dense"],
    ),
    "native_experts_with_expert_parallelism": (
        lambda c: (c.model.moe.update(expert_compute="native"), c.mesh.update(data=2, expert=4)),
        8, ["expert_compute='native'", "expert axis 4", "'auto'"],
    ),
    "native_experts_with_vision_moe": (
        lambda c: (c.model.moe.update(expert_compute="native"),
                   c.model.vision.update(moe_layers="all")), 1,
        ["expert_compute='native'", "GELU", "'routed'"],
    ),
    "unknown_grouped_matmul": (
        lambda c: c.model.moe.update(grouped_matmul="cutlass"), 1,
        ["model.moe.grouped_matmul='cutlass'", "megablox"],
    ),
    "unknown_balance_counts": (
        lambda c: c.model.moe.update(balance_counts="top2"), 1, ["balance_counts='top2'"],
    ),
    "zero_capacity_factor": (
        lambda c: c.model.moe.update(capacity_factor_eval=0.0), 1, ["capacity_factor_eval"],
    ),
    "moe_layer_out_of_range": (
        lambda c: c.model.decoder.update(moe_layers="1,4"), 1, ["[4] out of range", "4 layers"],
    ),
    "unknown_moe_layers": (
        lambda c: c.model.vision.update(moe_layers="odd"), 1, ["moe_layers='odd'", "every_other"],
    ),
    "kv_heads_do_not_divide_heads": (
        lambda c: c.model.decoder.update(num_kv_heads=3), 1, ["num_heads=4", "num_kv_heads=3"],
    ),
    "image_not_multiple_of_patch": (
        lambda c: c.model.vision.update(image_size=30), 1, ["image_size=30", "patch_size=8"],
    ),
    "select_layer_out_of_range": (
        lambda c: c.model.vision.update(select_layer=-5), 1, ["select_layer=-5", "depth 3"],
    ),
    "unknown_projector": (
        lambda c: c.model.projector.update(kind="qformer"), 1, ["projector.kind='qformer'"],
    ),
    "unknown_vision_activation": (
        lambda c: c.model.vision.update(activation="relu"), 1, ["vision.activation='relu'"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_raises_one_clear_error(case):
    edit, devices, words = BAD[case]
    cfg = run_config()
    edit(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg, devices)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize(
    "mesh, devices, want",
    [
        (dict(), 8, (8, 1, 1, 1)),
        (dict(data=-1, expert=4), 8, (2, 1, 4, 1)),
        (dict(data=1, fsdp=2, expert=2, tensor=2), 8, (1, 2, 2, 2)),
        (dict(data=2, fsdp=-1), 16, (2, 8, 1, 1)),
        (dict(), 1, (1, 1, 1, 1)),
    ],
)
def test_valid_mesh_resolves_the_rest_axis(mesh, devices, want):
    assert validate(run_config(**mesh), devices) == want


def test_make_mesh_checks_the_device_count():
    with pytest.raises(ValueError, match=r"needs 2 devices, got 1"):
        make_mesh((2, 1, 1, 1), jax.devices()[:1])
    mesh = make_mesh((1, 1, 1, 1), jax.devices()[:1])
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_build_model_needs_the_image_token_id():
    with pytest.raises(ValueError, match="image_token_id"):
        build_model(models.tiny())


@pytest.mark.parametrize(
    "spec, num_layers, want",
    [
        ("every_other", 5, (0, 2, 4)),
        ("all", 2, (0, 1)),
        ("none", 2, ()),
        ("first_half", 5, (0, 1)),
        ("second_half", 5, (2, 3, 4)),
        ([3, 0, 3], 4, (0, 3)),
        ("2, 0", 4, (0, 2)),
        ("1", 4, (1,)),
    ],
)
def test_moe_layer_specs(spec, num_layers, want):
    assert moe_layer_indices(spec, num_layers) == want


def test_moe_llava_preset_has_the_paper_shape():
    """MoE-LLaVA-1.6Bx4-Top2: CLIP-L/14-336 layer -2 without CLS (576 tokens), mlp2x_gelu,
    d=2048 x 24 layers, 32 heads, FFN 5632, vocab 100352, 4 experts top-2 on every other layer."""
    cfg = models.get("moe_llava_1p6bx4")
    validate(ml_collections.ConfigDict(dict(model=cfg, mesh=base.mesh_config())), 1)
    assert num_image_tokens(cfg) == 576
    v, d, m = cfg.vision, cfg.decoder, cfg.moe
    assert (v.image_size, v.patch_size, v.width, v.depth, v.select_layer) == (336, 14, 1024, 24, -2)
    assert v.class_token and not v.keep_class_token and v.activation == "quick_gelu"
    assert cfg.projector.kind == "mlp2x_gelu"
    assert (d.embed_dim, d.num_layers, d.num_heads, d.mlp_dim, d.vocab_size) == (
        2048, 24, 32, 5632, 100352,
    )
    assert (m.num_experts, m.top_k, d.moe_layers) == (4, 2, "every_other")
    # DeepSpeed 0.9.5 as MoE-LLaVA builds it: top2gating with Gumbel second choices on every
    # forward, weights over the kept choices, per-device capacity groups, min_capacity 0.
    assert (m.dispatch, m.combine_weights, m.second_choice_noise, m.capacity_group) == (
        "capacity", "renorm_kept", "always", "batch_shard")
    assert (m.min_capacity, m.capacity_factor_train, m.capacity_factor_eval) == (0, 1.5, 2.0)
    # Decoder parameter count, by hand: embeddings and head, 24 attention blocks, 12 dense SwiGLU
    # FFNs and 12 MoE FFNs (4 experts + router), 49 RMSNorms.
    cfg.image_token_id = 3
    ids = np.zeros((1, 4), np.int32)
    abstract = jax.eval_shape(
        Decoder(ml_collections.FrozenConfigDict(cfg)).init, jax.random.key(0), ids, ids, ids + 1
    )
    count = sum(x.size for x in jax.tree_util.tree_leaves(abstract))
    ffn = 3 * 2048 * 5632
    want = 2 * 100352 * 2048 + 24 * 4 * 2048 * 2048 + 12 * ffn + 12 * (4 * ffn + 2048 * 4)
    assert count == want + 49 * 2048
    assert 2.8e9 < count < 2.9e9  # MoE-LLaVA-1.6Bx4's 2.9B total less the vision tower
