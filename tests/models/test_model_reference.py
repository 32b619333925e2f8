"""ViT, decoder and the whole LVLM against the numpy reference in np_reference.py.

Covers the CLIP- and SigLIP-style encoders and the selected hidden layer, the decoder options
(qkv bias, qk-norm, tied embeddings, grouped-query attention, packing, remat), which blocks are
MoE for each `moe_layers` spec, image features spliced at the `<image>` positions (several images,
rows without an image, no images at all), the summed aux losses, CuMo's MoE in the ViT and the
projector, and its upcycled model giving the dense model's output.
"""

import functools

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from configs import models
from moe_lvlm.models.decoder import Decoder
from moe_lvlm.models.lvlm import build_model, moe_loss_sums
from moe_lvlm.models.vit import VisionEncoder
from moe_lvlm.parallel.mesh import LOGICAL_AXIS_RULES
from tests.models import np_reference as ref
from tests.models.fast import fast_jit

IMAGE_TOKEN = 3
TOL = dict(rtol=2e-4, atol=2e-4)


def small_config(**parts) -> ml_collections.ConfigDict:
    """tiny() shrunk further: 16x16 images (4 patches), width 32, decoder d=32."""
    cfg = models.tiny()
    cfg.vision.update(image_size=16, width=32, depth=3, num_heads=4, mlp_dim=48)
    cfg.decoder.update(
        vocab_size=64, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
        mlp_dim=48,
    )
    cfg.image_token_id = IMAGE_TOKEN
    for part, values in parts.items():
        cfg[part].update(values)
    return cfg


def random_params(module, rng, *args, **kwargs):
    """Random values for every parameter of `module` (shapes from an abstract init)."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)["params"]

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return (1 + 0.2 * rng.normal(size=leaf.shape)).astype(np.float32)
        std = 0.5 if "router" in name else 0.2
        return (std * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract))


def text_batch(rng, batch, seq, vocab, lengths):
    ids = rng.integers(4, vocab, (batch, seq)).astype(np.int32)
    segment_ids = (np.arange(seq)[None] < np.array(lengths)[:, None]).astype(np.int32)
    ids[segment_ids == 0] = 0
    positions = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
    return ids, positions, segment_ids


def assert_metrics_close(got, want):
    assert sorted(got) == sorted(want)
    for layer, metrics in want.items():
        for name, value in metrics.items():
            np.testing.assert_allclose(got[layer][name], value, **TOL, err_msg=f"{layer} {name}")


# --------------------------------------------------------------------------- ViT
VIT_CASES = {
    # CLIP: class token, pre-LN, quick-GELU, no patch bias; LLaVA's layer -2 without the CLS.
    "clip_layer_-2": dict(
        activation="quick_gelu", class_token=True, pre_norm=True, patch_bias=False,
        select_layer=-2, keep_class_token=False,
    ),
    "clip_layer_1_keep_cls": dict(
        activation="quick_gelu", class_token=True, pre_norm=True, patch_bias=False,
        select_layer=1, keep_class_token=True,
    ),
    # SigLIP: no class token, no pre-LN, GELU-tanh, patch bias; the last layer.
    "siglip_layer_-1": dict(
        activation="gelu_tanh", class_token=False, pre_norm=False, patch_bias=True,
        select_layer=-1, keep_class_token=False,
    ),
}


@pytest.mark.parametrize("case", sorted(VIT_CASES))
def test_vit_returns_the_selected_layer_of_the_reference(case):
    cfg = small_config(vision=VIT_CASES[case])
    v = cfg.vision
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    encoder = VisionEncoder(ml_collections.FrozenConfigDict(cfg))
    params = random_params(encoder, rng, images)
    # Hidden state i (HF indexing) needs blocks 0..i-1 only; later blocks are not built.
    blocks_needed = {"clip_layer_-2": 2, "clip_layer_1_keep_cls": 1, "siglip_layer_-1": 3}[case]
    assert sorted(k for k in params if k.startswith("layers_")) == [
        f"layers_{i}" for i in range(blocks_needed)
    ]
    assert ("cls" in params) == v.class_token and ("pre_norm" in params) == v.pre_norm
    assert ("bias" in params["patch_embed"]) == v.patch_bias

    features, metrics = fast_jit(encoder.apply, {"params": params}, images)(
        {"params": params}, images
    )
    want, _ = ref.vit(params, images, cfg)
    tokens = 4 + int(v.class_token and v.keep_class_token)
    assert features.shape == (2, tokens, 32) and metrics == {}
    np.testing.assert_allclose(features, want, **TOL)


# --------------------------------------------------------------------------- decoder
DECODER_CASES = {
    # Qwen3-like: qkv bias, qk-norm, tied embeddings, GQA 4/2, MoE in blocks 1 and 2 (dropless).
    "qkv_bias_qk_norm_tied_gqa": (
        dict(qkv_bias=True, qk_norm=True, tie_embeddings=True, num_kv_heads=2, moe_layers="1,2"),
        dict(dispatch="dropless"), False, "none",
    ),
    # LLaMA-like MHA, MoE every other block with capacity dispatch (train factor drops), remat.
    "mha_capacity_remat": (
        dict(num_kv_heads=4, moe_layers="every_other"),
        dict(dispatch="capacity", capacity_factor_train=0.75), False, "dots",
    ),
    # Packed rows (segments 1, 2, then padding), MQA.
    "packed_mqa": (dict(num_kv_heads=1, moe_layers="all"), dict(top_k=1), True, "full"),
}


@pytest.mark.parametrize("case", sorted(DECODER_CASES))
def test_decoder_matches_reference(case):
    decoder_opts, moe_opts, packed, remat = DECODER_CASES[case]
    cfg = small_config(decoder=decoder_opts, moe=moe_opts)
    cfg.remat = remat
    d = cfg.decoder
    rng = np.random.default_rng(1)
    ids, positions, segment_ids = text_batch(rng, 3, 10, 64, [10, 7, 9])
    if packed:
        segment_ids[0] = [1, 1, 1, 1, 2, 2, 2, 2, 2, 0]
        positions[0] = [0, 1, 2, 3, 0, 1, 2, 3, 4, 0]
        ids[0, -1] = 0
    decoder = Decoder(ml_collections.FrozenConfigDict(cfg), train=True, packed=packed)
    params = random_params(decoder, rng, ids, positions, segment_ids)
    attn = params["layers_0"]["attn"]
    assert ("bias" in attn["q"]) == d.qkv_bias and ("q_norm" in attn) == d.qk_norm
    assert attn["k"]["kernel"].shape == (32, d.num_kv_heads, 8)
    assert ("lm_head" in params) != d.tie_embeddings

    args = ({"params": params}, ids, positions, segment_ids)
    logits, metrics = fast_jit(decoder.apply, *args)(*args)
    want, want_metrics = ref.decoder(
        params, ids, positions, segment_ids, None, cfg, packed=packed, train=True
    )
    valid = segment_ids > 0
    np.testing.assert_allclose(np.asarray(logits)[valid], want[valid], **TOL)
    assert_metrics_close(metrics, want_metrics)
    if cfg.moe.dispatch == "capacity":
        assert max(m["dropped_fraction"] for m in want_metrics.values()) > 0


@pytest.mark.parametrize(
    "spec, num_layers, want",
    [
        ("every_other", 5, [0, 2, 4]),
        ("every_other", 4, [0, 2]),
        ("all", 3, [0, 1, 2]),
        ("none", 3, []),
        ("3,1", 4, [1, 3]),
        ("second_half", 4, [2, 3]),
    ],
)
def test_moe_layers_choose_the_block_types(spec, num_layers, want):
    cfg = small_config(decoder=dict(num_layers=num_layers, moe_layers=spec))
    cfg.vision.update(depth=num_layers, select_layer=-1, moe_layers=spec)
    cfg.projector.moe = True
    model = build_model(cfg)
    ids = np.zeros((1, 8), np.int32)
    images = np.zeros((1, 1, 16, 16, 3), np.float32)
    params = nn.meta.unbox(
        jax.eval_shape(model.init, jax.random.key(0), ids, ids, ids + 1, images)["params"]
    )
    for part in ("decoder", "vision"):
        blocks = params[part]
        moe_blocks = [i for i in range(num_layers) if "moe" in blocks[f"layers_{i}"]]
        dense_blocks = [i for i in range(num_layers) if "mlp" in blocks[f"layers_{i}"]]
        assert moe_blocks == want, part
        assert dense_blocks == sorted(set(range(num_layers)) - set(want)), part
    assert sorted(params["projector"]) == ["moe"]
    experts = params["decoder"][f"layers_{want[0]}"]["moe"]["experts"] if want else None
    if experts is not None:
        assert sorted(experts) == ["down", "gate", "up"]
        assert experts["gate"].shape == (4, 32, 48)


# --------------------------------------------------------------------------- the whole model
def cumo_config(dispatch: str = "dropless") -> ml_collections.ConfigDict:
    """MoE in ViT blocks 1-2 (block 2 is past layer -2, so not built), projector and decoder."""
    return small_config(
        vision=dict(moe_layers="1,2"), projector=dict(moe=True), moe=dict(dispatch=dispatch)
    )


def mixed_batch(rng):
    """Row 0: two images (8 placeholders), row 1: text only, row 2: one image, padded."""
    ids, positions, segment_ids = text_batch(rng, 3, 16, 64, [16, 12, 14])
    ids[0, 2:10] = IMAGE_TOKEN
    ids[2, 5:9] = IMAGE_TOKEN
    images = rng.normal(size=(3, 2, 16, 16, 3)).astype(np.float32)
    images[1] = 0  # what a pipeline feeds for a row without an image
    return ids, positions, segment_ids, images


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_lvlm_matches_reference_on_a_mixed_batch(dispatch):
    cfg = cumo_config(dispatch)
    cfg.moe.capacity_factor_train = 1.0
    rng = np.random.default_rng(2)
    ids, positions, segment_ids, images = mixed_batch(rng)
    model = build_model(cfg)
    params = random_params(model, rng, ids, positions, segment_ids, images)
    args = ({"params": params}, ids, positions, segment_ids, images)
    logits, metrics = fast_jit(functools.partial(model.apply, train=True), *args)(*args)
    want, want_metrics = ref.lvlm(params, ids, positions, segment_ids, images, cfg, train=True)
    valid = segment_ids > 0
    np.testing.assert_allclose(np.asarray(logits)[valid], want[valid], **TOL)
    assert sorted(metrics) == ["decoder/layers_0", "decoder/layers_2", "projector",
                               "vision/layers_1"]
    assert_metrics_close(metrics, want_metrics)
    # Only the 3 used images (row 0's two, row 2's first) count in the vision MoE: with all 6
    # (the zero fillers too) its statistics would differ.
    _, all_images = ref.vit(params["vision"], images.reshape(6, 16, 16, 3), cfg, train=True)
    got_entropy = metrics["vision/layers_1"]["router_entropy"]
    assert abs(all_images["vision/layers_1"]["router_entropy"] - got_entropy) > 1e-3
    balance, z = moe_loss_sums(metrics)
    np.testing.assert_allclose(
        balance, sum(m["balance_loss"] for m in want_metrics.values()), **TOL
    )
    np.testing.assert_allclose(z, sum(m["z_loss"] for m in want_metrics.values()), **TOL)


def test_image_positions_take_the_image_features_and_text_only_batches_work():
    cfg = small_config()
    rng = np.random.default_rng(3)
    ids, positions, segment_ids, images = mixed_batch(rng)
    model = build_model(cfg)
    params = random_params(model, rng, ids, positions, segment_ids, images)
    apply = fast_jit(model.apply, {"params": params}, ids, positions, segment_ids, images)
    logits, _ = apply({"params": params}, ids, positions, segment_ids, images)
    valid = segment_ids > 0
    # The <image> token's own embedding never reaches the model where an image is spliced in.
    changed = jax.tree_util.tree_map(np.array, params)
    changed["decoder"]["embedding"][IMAGE_TOKEN] += 5.0
    logits_changed, _ = apply({"params": changed}, ids, positions, segment_ids, images)
    np.testing.assert_array_equal(np.asarray(logits_changed)[valid], np.asarray(logits)[valid])
    # The second image of row 2 has no placeholders, so its pixels play no part.
    other = images.copy()
    other[2, 1] += 1.0
    other[1] = rng.normal(size=other[1].shape)
    logits_other, _ = apply({"params": params}, ids, positions, segment_ids, other)
    np.testing.assert_allclose(np.asarray(logits_other)[valid], np.asarray(logits)[valid],
                               rtol=1e-6, atol=1e-6)
    # No images at all: a text-only batch (no vision parameters needed).
    text_ids = np.where(ids == IMAGE_TOKEN, 7, ids)
    text_params = {"decoder": params["decoder"]}
    args = ({"params": text_params}, text_ids, positions, segment_ids)
    logits_text, metrics = fast_jit(model.apply, *args)(*args)
    want, want_metrics = ref.lvlm(params, text_ids, positions, segment_ids, None, cfg)
    np.testing.assert_allclose(np.asarray(logits_text)[valid], want[valid], **TOL)
    assert sorted(metrics) == ["decoder/layers_0", "decoder/layers_2"]
    assert_metrics_close(metrics, want_metrics)


def upcycle_by_hand(dense, moe_abstract, rng):
    """Each `.../moe` gets E copies of the sibling dense `.../mlp` and a random router."""
    out = {}
    for key, value in moe_abstract.items():
        if key == "moe":
            mlp = dense["mlp"]
            experts = {}
            for name in value["experts"]:
                layer, _, kind = name.partition("_")
                tensor = mlp[layer]["bias" if kind else "kernel"]
                experts[name] = np.stack([tensor] * value["experts"][name].shape[0])
            router = (rng.normal(size=value["router"].shape)).astype(np.float32)
            out[key] = {"router": router, "experts": experts}
        elif isinstance(value, dict):
            out[key] = upcycle_by_hand(dense[key], value, rng)
        else:
            out[key] = dense[key]
    return out


def test_cumo_upcycled_model_gives_the_dense_output():
    """CuMo co-upcycling: experts in ViT blocks, projector and decoder copied from the dense FFNs
    give the dense model's logits on the first (train) step, whatever the random routers say, in
    both dispatch modes (capacity: factor 2 with E=4, k=2 is C = tokens, nothing dropped)."""
    dense_cfg = small_config(vision=dict(moe_layers="none"), decoder=dict(moe_layers="none"))
    rng = np.random.default_rng(4)
    ids, positions, segment_ids, images = mixed_batch(rng)
    args = (ids, positions, segment_ids, images)
    dense_model = build_model(dense_cfg)
    dense = random_params(dense_model, rng, *args)
    want, _ = fast_jit(dense_model.apply, {"params": dense}, *args)({"params": dense}, *args)
    valid = segment_ids > 0
    for dispatch in ("dropless", "capacity"):
        moe_cfg = cumo_config(dispatch)
        moe_cfg.vision.moe_layers = "all"
        moe_cfg.moe.capacity_factor_train = 2.0
        moe_model = build_model(moe_cfg)
        moe_abstract = nn.meta.unbox(
            jax.eval_shape(moe_model.init, jax.random.key(0), *args)["params"]
        )
        variables = {"params": upcycle_by_hand(dense, moe_abstract, rng)}
        apply = fast_jit(functools.partial(moe_model.apply, train=True), variables, *args)
        logits, metrics = apply(variables, *args)
        # Vision blocks 0-1 (of 3, layer -2), the projector, decoder blocks 0 and 2.
        assert len(metrics) == 5, sorted(metrics)
        np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(want)[valid],
                                   rtol=1e-5, atol=1e-5, err_msg=dispatch)
        for m in metrics.values():
            assert float(m["dropped_fraction"]) == 0.0


def test_every_parameter_has_logical_axis_names():
    """The boxed init of a model with every option on: each leaf is LogicallyPartitioned with one
    name per dimension, each name in the rule table; expert tensors lead with 'expert'."""
    cfg = cumo_config()
    cfg.vision.update(patch_bias=True, moe_layers="all", select_layer=-1)
    cfg.decoder.update(qkv_bias=True, qk_norm=True)
    model = build_model(cfg)
    ids = np.zeros((1, 8), np.int32)
    images = np.zeros((1, 1, 16, 16, 3), np.float32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), ids, ids, ids + 1, images)["params"]
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), where
        assert len(leaf.names) == leaf.value.ndim, where
        assert set(leaf.names) - {None} <= known, where
        if "experts" in where:
            assert leaf.names[0] == "expert", where
    specs = jax.tree_util.tree_leaves(
        nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    assert len(specs) == len(leaves) > 50
    assert all(isinstance(s, jax.sharding.PartitionSpec) for s in specs)


def test_packed_row_gives_each_sample_its_unpacked_logits():
    """Two image samples packed in one row (segments 1 and 2, positions restarting, images in
    placeholder order) get the logits each gets alone: no attention or image crosses segments."""
    cfg = small_config(moe=dict(dispatch="dropless"))
    rng = np.random.default_rng(4)
    lengths = (9, 11)
    alone = []
    for n in lengths:
        ids, positions, segment_ids = text_batch(rng, 1, 20, 64, [n])
        ids[0, 1:5] = IMAGE_TOKEN
        alone.append((ids, positions, segment_ids, rng.normal(size=(1, 1, 16, 16, 3))))
    packed_ids = np.zeros((1, 20), np.int32)
    packed_ids[0, :9], packed_ids[0, 9:20] = alone[0][0][0, :9], alone[1][0][0, :11]
    packed_pos = np.concatenate([np.arange(9), np.arange(11)])[None].astype(np.int32)
    packed_seg = np.repeat([1, 2], lengths)[None].astype(np.int32)
    packed_images = np.concatenate([alone[0][3], alone[1][3]], axis=1).astype(np.float32)
    model = build_model(cfg)
    params = random_params(model, rng, packed_ids, packed_pos, packed_seg, packed_images)
    args = ({"params": params}, packed_ids, packed_pos, packed_seg, packed_images)
    packed, _ = fast_jit(functools.partial(model.apply, packed=True), *args)(*args)
    for (ids, positions, segment_ids, image), span in zip(
        alone, (slice(0, 9), slice(9, 20)), strict=True
    ):
        image = np.concatenate([image, np.zeros_like(image)], axis=1).astype(np.float32)
        want, _ = ref.lvlm(params, ids, positions, segment_ids, image, cfg)
        n = span.stop - span.start
        np.testing.assert_allclose(np.asarray(packed)[0, span], want[0, :n], **TOL)
