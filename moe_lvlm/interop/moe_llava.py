"""MoE-LLaVA checkpoints (PKU-YuanGroup/MoE-LLaVA, DeepSpeed-MoE layout) -> model config + params.

A released MoE-LLaVA directory holds config.json and safetensors with:

  decoder    StableLM-2 / Phi-2 keys under 'model.', Qwen-1 keys under 'transformer.'
             (moe_lvlm/interop/layout.py FAMILIES), the LM head at 'lm_head.weight'
  MoE layers '<layer>.mlp.deepspeed_moe.gate.wg.weight' (router [E, d]) and
             '<layer>.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.<FFN names>.weight'
             (each expert a copy of the dense FFN: gate_proj/up_proj/down_proj, fc1/fc2 with
             biases, or Qwen-1's w1/w2/c_proj)
  vision     '<prefix>image_tower.image_tower.vision_model.' (HF CLIPVisionModel); the tower's own
             config is not in the directory, only its name `mm_image_tower`
  projector  '<prefix>mm_projector.image_spatial_proj.{0,2}' (mlp2x_gelu) or '.image_spatial_proj'
             (linear)

config.json carries the text model's fields (model_type moe_llava_stablelm / moe_llava_phi /
moe_llava_qwen, or llava_* for the dense stage-II models), the `moe` section (moe_enable,
moe_layers_idx, num_experts per MoE layer, top_k_experts, capacity_factor,
eval_capacity_factor, min_capacity, use_residual, router_aux_loss_coef) and the mm_* fields.
"""

from pathlib import Path

import ml_collections
from flax import traverse_util

from moe_lvlm import presets
from moe_lvlm.interop import hf_import, layout
from moe_lvlm.interop.hf_import import CheckpointError
from moe_lvlm.interop.safetensors_io import Checkpoint
from moe_lvlm.models.vit import num_layers_run

TEXT_TYPES = {
    f"{p}_{name}": base
    for p in ("moe_llava", "llava")
    for name, base in (("stablelm", "stablelm"), ("phi", "phi"), ("qwen", "qwen"))
}
PREFIX = {"stablelm": "model.", "phi": "model.", "qwen": "transformer."}
# HF CLIPVisionConfig of the towers MoE-LLaVA's scripts name (checked against the released configs).
TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(
        model_type="clip_vision_model",
        image_size=336,
        patch_size=14,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
}
PROJECTORS = {"mlp2x_gelu": "mlp2x_gelu", "linear": "linear"}


def _vision_hf(hf: dict, where: str, vision_config: str | Path | None) -> tuple[dict, Path | None]:
    if vision_config:
        directory = Path(vision_config)
        return hf_import._vision_section(hf_import.read_config(directory)), directory
    tower = hf.get("mm_image_tower")
    if tower not in TOWERS:
        raise CheckpointError(
            f"{where}: mm_image_tower={tower!r} is not a known tower {sorted(TOWERS)}; pass "
            "--vision_config=DIR, a directory holding that tower's HF config.json"
        )
    return TOWERS[tower], None


def model_config(
    hf: dict, where: str, vision_config: str | Path | None = None
) -> ml_collections.ConfigDict:
    """MoE-LLaVA config.json -> our `config.model` section."""
    kind = hf.get("model_type")
    if kind not in TEXT_TYPES:
        raise CheckpointError(
            f"{where}: model_type {kind!r} is not a MoE-LLaVA model {sorted(TEXT_TYPES)}"
        )
    if hf.get("mm_use_im_start_end"):
        raise CheckpointError(f"{where}: mm_use_im_start_end=True (image start/end tokens)")
    cfg = presets.tiny()
    cfg.decoder = hf_import.variant_decoder_config(dict(hf, model_type=TEXT_TYPES[kind]), where)
    feature = hf.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"{where}: mm_vision_select_feature={feature!r}")
    vision_hf, vision_dir = _vision_hf(hf, where, vision_config)
    cfg.vision = hf_import.vision_config(
        vision_hf,
        where,
        int(hf.get("mm_vision_select_layer", -2)),
        feature == "cls_patch",
        vision_dir,
    )
    projector = hf.get("image_projector_type", hf.get("mm_projector_type", "linear"))
    if projector not in PROJECTORS:
        raise CheckpointError(f"{where}: image_projector_type={projector!r} is not supported")
    cfg.projector.kind = PROJECTORS[projector]
    moe = hf.get("moe") or {}
    if moe.get("moe_enable", False):
        cfg.decoder.moe_layers, moe_updates = _moe_section(moe, cfg.decoder.num_layers, where)
        cfg.moe.update(moe_updates)
    return cfg


def _moe_section(moe: dict, num_layers: int, where: str) -> tuple:
    """(decoder.moe_layers, model.moe updates) from MoE-LLaVA's `moe` config section."""
    layers = moe.get("moe_layers_idx")
    if not layers:
        raise CheckpointError(f"{where}: moe.moe_enable=True but moe.moe_layers_idx is empty")
    experts = moe.get("num_experts")
    experts = experts if isinstance(experts, list) else [experts] * len(layers)
    if len(set(experts)) != 1 or len(experts) != len(layers):
        raise CheckpointError(
            f"{where}: moe.num_experts={experts} for layers {layers}; every MoE layer must have "
            "the same number of experts"
        )
    if moe.get("use_residual", False):
        raise CheckpointError(f"{where}: moe.use_residual=True (residual MoE) is not supported")
    top_k = int(moe.get("top_k_experts", 2))
    if top_k not in (1, 2):
        raise CheckpointError(f"{where}: moe.top_k_experts={top_k}; DeepSpeed gates top-1/2")
    updates = dict(
        num_experts=int(experts[0]),
        top_k=top_k,
        # The eval capacity MoE-LLaVA uses (E=4, k=2, factor 2) drops no token: dropless is the
        # same computation (tests/interop/test_moe_llava.py); capacity is a config change away.
        dispatch="dropless",
        capacity_factor_train=float(moe.get("capacity_factor", 1.0)),
        capacity_factor_eval=float(moe.get("eval_capacity_factor", 2.0)),
        balance_loss_coef=float(moe.get("router_aux_loss_coef", 0.01)),
        balance_counts="top1",
    )
    return hf_import.named_moe_layers(list(layers), num_layers), updates


def projector_entries(kind: str, prefix: str) -> list[layout.Entry]:
    p = f"{prefix}mm_projector.image_spatial_proj"
    if kind == "linear":
        return [
            layout.Entry(f"{p}.weight", "projector/fc/kernel", "linear"),
            layout.Entry(f"{p}.bias", "projector/fc/bias"),
        ]
    out = []
    for i, index in ((1, 0), (2, 2)):
        out += [
            layout.Entry(f"{p}.{index}.weight", f"projector/mlp/fc{i}/kernel", "linear"),
            layout.Entry(f"{p}.{index}.bias", f"projector/mlp/fc{i}/bias"),
        ]
    return out


def entries(model_cfg: ml_collections.ConfigDict, text_kind: str) -> list[layout.Entry]:
    """Every (MoE-LLaVA key, our path) pair of a model."""
    prefix = PREFIX[text_kind]
    v = model_cfg.vision
    family = hf_import.FAMILY.get(text_kind, "llama")
    return (
        layout.vision_entries(
            v,
            f"{prefix}image_tower.image_tower.vision_model.",
            num_layers_run(v.depth, v.select_layer),
        )
        + projector_entries(model_cfg.projector.kind, prefix)
        + layout.decoder_entries(
            model_cfg.decoder,
            model_cfg.moe.num_experts,
            prefix,
            "lm_head.weight",
            "deepspeed",
            family,
        )
    )


def import_moe_llava(
    directory: str | Path, vision_config: str | Path | None = None
) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """A MoE-LLaVA directory -> (model config, nested numpy params, its config.json)."""
    directory = Path(directory)
    where = str(directory / "config.json")
    hf = hf_import.read_config(directory)
    model_cfg = model_config(hf, where, vision_config)
    ckpt = Checkpoint(directory)
    shapes = hf_import.param_shapes(model_cfg)
    flat = hf_import.load_entries(ckpt, entries(model_cfg, TEXT_TYPES[hf["model_type"]]), shapes)
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise CheckpointError(f"{directory}: no tensors for {missing[:5]}")
    return model_cfg, traverse_util.unflatten_dict(flat, sep="/"), hf
