"""Export to LlavaForConditionalGeneration: PyTorch logits match the JAX model's (fp32, <= 1e-4),
re-import is exact, and models with no exact HF equivalent are refused."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers  # noqa: E402  (after the importorskip in hf_helpers)
from flax import traverse_util

from moe_lvlm.interop import hf_export, hf_import
from moe_lvlm.models.lvlm import build_model
from tests.interop.hf_helpers import (
    TOL,
    jit_apply,
    max_err,
    random_params,
    tiny_model_config,
    torch,
)

CASES = {
    # name: (decoder overrides, other model overrides, HF text model_type)
    "qwen2_moe": (dict(moe_layers="every_other", qkv_bias=True, head_dim=16), {}, "qwen2_moe"),
    "qwen3_moe": (dict(moe_layers="every_other", qk_norm=True, qkv_bias=True), {}, "qwen3_moe"),
    "mixtral": (dict(moe_layers="all"), {}, "mixtral"),
    # top-1 weighs by the raw probability: norm_topk_prob=False, which only qwen2_moe offers.
    "qwen2_moe_top1": (dict(moe_layers="all"), dict(top_k=1), "qwen2_moe"),
    "llama_tied": (dict(tie_embeddings=True), {}, "llama"),
    "qwen2_siglip_linear": (dict(qkv_bias=True), dict(siglip=True, linear=True), "qwen2"),
    "qwen3_keep_cls": (dict(qk_norm=True), dict(keep_cls=True), "qwen3"),
}


def make_config(name):
    decoder, other, _ = CASES[name]
    cfg = tiny_model_config(**decoder)
    if other.get("siglip"):
        cfg.vision.update(
            class_token=False,
            pre_norm=False,
            patch_bias=True,
            activation="gelu_tanh",
            layer_norm_eps=1e-6,
            select_layer=-1,
        )
    if other.get("linear"):
        cfg.projector.kind = "linear"
    if other.get("keep_cls"):
        cfg.vision.update(keep_class_token=True, select_layer=1)
    if other.get("top_k"):
        cfg.moe.top_k = other["top_k"]
    return cfg


def inputs(cfg, batch=2):
    """Rows: [bos, text, N image tokens, text]; images [batch, 1, H, W, 3]."""
    rng = np.random.RandomState(3)
    n = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    n += int(cfg.vision.class_token and cfg.vision.keep_class_token)
    text = rng.randint(8, cfg.decoder.vocab_size, (batch, 7))
    ids = np.concatenate([text[:, :2], np.full((batch, n), cfg.image_token_id), text[:, 2:]], 1)
    images = rng.randn(batch, 1, cfg.vision.image_size, cfg.vision.image_size, 3)
    return ids, images.astype(np.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_logits_match_and_reimport_is_exact(tmp_path, name):
    cfg = make_config(name)
    params = random_params(cfg)
    ids, images = inputs(cfg)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    ours, _ = jit_apply(build_model(cfg), params, ids, pos, jnp.ones_like(ids), images)

    shard = 20_000 if name == "qwen2_moe" else 2 << 30
    hf_export.export(params, cfg, tmp_path, max_shard_bytes=shard)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_config"]["model_type"] == CASES[name][2]
    if CASES[name][2] != "mixtral" and cfg.decoder.moe_layers != "none":
        assert config["text_config"]["norm_topk_prob"] == (cfg.moe.top_k > 1)
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    with torch.no_grad():
        pixels = torch.tensor(images[:, 0].transpose(0, 3, 1, 2))
        theirs = model(input_ids=torch.tensor(ids), pixel_values=pixels).logits.numpy()
    assert max_err(ours, theirs) <= TOL

    cfg2, params2 = hf_import.import_llava(tmp_path)
    for section in ("vision", "decoder", "projector"):
        assert cfg2[section].to_dict() == cfg[section].to_dict(), section
    assert (cfg2.moe.num_experts, cfg2.moe.top_k, cfg2.image_token_id) == (
        cfg.moe.num_experts,
        cfg.moe.top_k,
        cfg.image_token_id,
    )
    flat, flat2 = (traverse_util.flatten_dict(p, sep="/") for p in (params, params2))
    assert sorted(flat) == sorted(flat2)
    for path, value in flat.items():
        np.testing.assert_array_equal(flat2[path], value, err_msg=path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.vision.update(moe_layers="all"), "vision tower has MoE layers"),
        (lambda c: c.projector.update(moe=True), "MoE projector"),
        (lambda c: c.vision.update(pre_norm=False), "matches neither CLIP"),
    ],
)
def test_export_refuses_models_without_exact_hf_equivalent(tmp_path, change, message):
    cfg = tiny_model_config(moe_layers="every_other")
    change(cfg)
    with pytest.raises(hf_export.ExportError, match=message):
        hf_export.export(random_params(cfg), cfg, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_bfloat16_export_reimports_as_the_cast_params(tmp_path):
    cfg = tiny_model_config(moe_layers="every_other", qk_norm=True)
    params = random_params(cfg)
    hf_export.export(params, cfg, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    _, params2 = hf_import.import_llava(tmp_path)
    flat2 = traverse_util.flatten_dict(params2, sep="/")
    for path, value in traverse_util.flatten_dict(params, sep="/").items():
        assert str(flat2[path].dtype) == "bfloat16", path
        np.testing.assert_array_equal(
            flat2[path].astype(np.float32), value.astype(jnp.bfloat16).astype(np.float32), path
        )
