"""Export to a directory that `transformers.LlavaForConditionalGeneration.from_pretrained` loads.

The text model is the HF architecture that reproduces this decoder exactly:

  dense                         llama, qwen2 (qkv bias; also Qwen-1), qwen3 (qk-norm),
                                stablelm (LayerNorm, partial RoPE) or phi (Phi-2's block
                                without the LM head bias, which Llava's lm_head lacks)
  MoE, qk-norm                  qwen3_moe (`mlp_only_layers` = the dense layers)
  MoE in every layer, no bias   mixtral
  other MoE (e.g. qkv bias)     qwen2_moe with a zero-size shared expert

All of them route as here (fp32 softmax over every expert, top-k; weights renormalised over the k
chosen, `norm_topk_prob=True`, or with `moe.combine_weights` resolving to 'softmax', as top-1 does
by default, the raw probabilities: `norm_topk_prob=False`, which mixtral lacks, so such a model
exports as qwen2_moe) and compute every routed token (dropless), so a model trained with capacity
dispatch exports too; only its dropped tokens differ ('renorm_kept' is 'renorm_chosen' when nothing
is dropped). HF draws no second-choice noise. HF has no MoE in the vision tower or projector, no MoE
StableLM or Phi, and no LM head bias (Phi-2): such models are refused. Vision blocks after
`vision.select_layer` are not part of this model; they are written as all-zero blocks (each is then
the identity) and the post-layernorm as the identity, neither of which LLaVA's
`vision_feature_layer` output reads.
"""

import json
import warnings
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util
from flax.linen import meta

from moe_lvlm.cli import UserError
from moe_lvlm.config import moe_layer_indices, num_image_tokens
from moe_lvlm.data.image import ASPECT_MODES
from moe_lvlm.data.tokenizer import IMAGE_TOKEN, Tokenizer
from moe_lvlm.interop import hf_tokenizer, layout
from moe_lvlm.interop.safetensors_io import write_checkpoint
from moe_lvlm.models.decoder import VARIANT_DEFAULTS, variant
from moe_lvlm.models.vit import num_layers_run

VISION_PREFIX = "vision_tower."
PROJECTOR_PREFIX = "multi_modal_projector."
DECODER_PREFIX = "language_model.model."
HEAD_KEY = "language_model.lm_head.weight"
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


class ExportError(UserError, ValueError):
    """The model has no exact transformers equivalent; the message says which part and why (the
    export CLI prints it as one `error: ...` line)."""


# --------------------------------------------------------------------------- configs
def vision_kind(v: ml_collections.ConfigDict) -> str:
    if v.class_token and v.pre_norm and not v.patch_bias:
        return "clip_vision_model"
    if not v.class_token and not v.pre_norm and v.patch_bias:
        return "siglip_vision_model"
    raise ExportError(
        f"vision tower with class_token={v.class_token}, pre_norm={v.pre_norm}, "
        f"patch_bias={v.patch_bias} matches neither CLIP (class token, pre-norm, no patch bias) "
        "nor SigLIP (none of them, patch bias)"
    )


def renormalises(moe: ml_collections.ConfigDict) -> bool:
    """Whether the combine weights are the top-k probabilities over their sum (HF
    `norm_topk_prob`), not the raw probabilities."""
    mode = moe.get("combine_weights", "auto")
    return moe.top_k > 1 if mode == "auto" else mode != "softmax"


def _variant_kind(d: ml_collections.ConfigDict) -> str | None:
    """'stablelm' or 'phi' for a decoder with their options, None for a LLaMA-family one."""
    opts = {k: variant(d, k) for k in VARIANT_DEFAULTS}
    if opts == VARIANT_DEFAULTS:
        return None
    phi = dict(
        norm="layer",
        parallel_block=True,
        ffn="mlp",
        activation="gelu_tanh",
        out_bias=True,
        head_bias=True,
    )
    if all(opts[k] == v for k, v in phi.items()) and d.qkv_bias and not d.qk_norm:
        return "phi"
    stablelm = dict(norm="layer", ffn="swiglu", activation="silu", out_bias=False, head_bias=False)
    if all(opts[k] == v for k, v in stablelm.items()) and not d.qk_norm:
        return "stablelm"
    raise ExportError(
        f"decoder options {opts} match no transformers text model (LLaMA family, StableLM, Phi)"
    )


def text_kind(model_cfg: ml_collections.ConfigDict) -> str:
    d = model_cfg.decoder
    moe_at = moe_layer_indices(d.moe_layers, d.num_layers)
    kind = _variant_kind(d)
    if kind and moe_at:
        raise ExportError(
            f"a {kind} decoder with MoE layers {list(moe_at)}: transformers has no MoE class for "
            f"the {kind} architecture, so no exact HF equivalent exists (dense stages export as "
            f"{kind}; run the MoE model with moe_lvlm.generate / evaluate)"
        )
    if variant(d, "head_bias"):
        raise ExportError(
            "decoder.head_bias=True (Phi-2's LM head bias): transformers' "
            "LlavaForConditionalGeneration has an LM head without bias, so no exact HF "
            "equivalent exists; run the model with moe_lvlm.generate / evaluate"
        )
    if kind:
        return kind
    if not moe_at:
        return "qwen3" if d.qk_norm else ("qwen2" if d.qkv_bias else "llama")
    if d.qk_norm:
        return "qwen3_moe"
    if len(moe_at) == d.num_layers and not d.qkv_bias and renormalises(model_cfg.moe):
        return "mixtral"
    return "qwen2_moe"


def check_exportable(model_cfg: ml_collections.ConfigDict) -> None:
    """Raises ExportError when no transformers model reproduces `model_cfg` exactly."""
    v = model_cfg.vision
    if moe_layer_indices(v.moe_layers, v.depth):
        raise ExportError(
            f"vision.moe_layers={v.moe_layers!r}: the vision tower has MoE layers (CuMo), and "
            "transformers' CLIP/SigLIP vision models have only dense MLPs; no exact HF equivalent"
        )
    if model_cfg.projector.moe:
        raise ExportError(
            "projector.moe=True: LLaVA's multi_modal_projector is a dense MLP in transformers; "
            "an MoE projector (CuMo) has no exact HF equivalent"
        )
    vision_kind(v)
    if v.activation not in HF_ACTIVATIONS:
        raise ExportError(f"vision.activation={v.activation!r} has no HF name")


def text_config(model_cfg: ml_collections.ConfigDict, special: dict) -> dict:
    d, moe = model_cfg.decoder, model_cfg.moe
    kind = text_kind(model_cfg)
    moe_at = moe_layer_indices(d.moe_layers, d.num_layers)
    cfg = dict(
        model_type=kind,
        vocab_size=d.vocab_size,
        hidden_size=d.embed_dim,
        intermediate_size=d.mlp_dim,
        num_hidden_layers=d.num_layers,
        num_attention_heads=d.num_heads,
        num_key_value_heads=d.num_kv_heads,
        head_dim=d.head_dim,
        hidden_act="silu",
        rms_norm_eps=d.norm_eps,
        rope_parameters=dict(rope_type="default", rope_theta=d.rope_theta),
        max_position_embeddings=32768,
        tie_word_embeddings=bool(d.tie_embeddings),
        attention_dropout=0.0,
        **special,
    )
    if kind in ("stablelm", "phi"):
        del cfg["rms_norm_eps"]
        rotary = float(variant(d, "rotary_fraction"))
        cfg.update(
            layer_norm_eps=d.norm_eps,
            qk_layernorm=False,
            rope_parameters=dict(cfg["rope_parameters"], partial_rotary_factor=rotary),
            hidden_act="gelu_new" if kind == "phi" else "silu",
        )
    if kind == "stablelm":
        cfg.update(
            use_qkv_bias=bool(d.qkv_bias), use_parallel_residual=variant(d, "parallel_block")
        )
    if kind in ("llama", "qwen3", "qwen3_moe"):
        cfg["attention_bias"] = bool(d.qkv_bias)  # also an o_proj bias, written as zeros
    if kind in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=d.num_layers)
    if kind in ("qwen2_moe", "qwen3_moe"):
        cfg.update(
            num_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            moe_intermediate_size=d.mlp_dim,
            norm_topk_prob=renormalises(moe),
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(d.num_layers) if i not in moe_at],
            output_router_logits=False,
        )
    if kind == "qwen2_moe":
        cfg.update(qkv_bias=bool(d.qkv_bias), shared_expert_intermediate_size=0)
    if kind == "mixtral":
        cfg.update(
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            router_jitter_noise=0.0,
            sliding_window=None,
            output_router_logits=False,
        )
    return cfg


def vision_config(model_cfg: ml_collections.ConfigDict) -> dict:
    v = model_cfg.vision
    cfg = dict(
        model_type=vision_kind(v),
        hidden_size=v.width,
        intermediate_size=v.mlp_dim,
        num_hidden_layers=v.depth,
        num_attention_heads=v.num_heads,
        num_channels=3,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act=HF_ACTIVATIONS[v.activation],
        layer_norm_eps=v.layer_norm_eps,
        attention_dropout=0.0,
    )
    if cfg["model_type"] == "siglip_vision_model":
        cfg["vision_use_head"] = False
    return cfg


def llava_config(model_cfg: ml_collections.ConfigDict, special: dict, dtype: str) -> dict:
    v = model_cfg.vision
    keep_first = v.keep_class_token or not v.class_token
    return dict(
        architectures=["LlavaForConditionalGeneration"],
        model_type="llava",
        vision_config=vision_config(model_cfg),
        text_config=text_config(model_cfg, special),
        image_token_index=int(model_cfg.image_token_id),
        image_seq_length=num_image_tokens(model_cfg),
        projector_hidden_act="gelu" if model_cfg.projector.kind == "mlp2x_gelu" else "linear",
        multimodal_projector_bias=True,
        vision_feature_layer=int(v.select_layer),
        vision_feature_select_strategy="full" if keep_first else "default",
        tie_word_embeddings=bool(model_cfg.decoder.tie_embeddings),
        dtype=dtype,
    )


# --------------------------------------------------------------------------- tensors
def entries(model_cfg: ml_collections.ConfigDict) -> list[layout.Entry]:
    """Every (HF key, our path) pair of the exported LLaVA, in the on-disk layout."""
    v, d = model_cfg.vision, model_cfg.decoder
    kind = text_kind(model_cfg)
    style = "mixtral" if kind == "mixtral" else "qwen"
    family = "phi" if kind == "phi" else "llama"
    return (
        layout.vision_entries(v, VISION_PREFIX, num_layers_run(v.depth, v.select_layer))
        + layout.projector_entries(model_cfg.projector.kind, PROJECTOR_PREFIX)
        + layout.decoder_entries(
            d, model_cfg.moe.num_experts, DECODER_PREFIX, HEAD_KEY, style, family=family
        )
    )


def _constant_tensors(model_cfg: ml_collections.ConfigDict, dtype) -> dict[str, np.ndarray]:
    """Tensors HF needs that carry nothing of this model: identity/zero blocks and biases."""
    v, d = model_cfg.vision, model_cfg.decoder
    w, f, e = v.width, v.mlp_dim, d.embed_dim
    out = {
        f"{VISION_PREFIX}post_layernorm.weight": np.ones(w, dtype),
        f"{VISION_PREFIX}post_layernorm.bias": np.zeros(w, dtype),
    }
    block = {
        "layer_norm1.weight": (w,),
        "layer_norm1.bias": (w,),
        "layer_norm2.weight": (w,),
        "layer_norm2.bias": (w,),
        "mlp.fc1.weight": (f, w),
        "mlp.fc1.bias": (f,),
        "mlp.fc2.weight": (w, f),
        "mlp.fc2.bias": (w,),
        "self_attn.out_proj.weight": (w, w),
        "self_attn.out_proj.bias": (w,),
    }
    block.update(
        {
            f"self_attn.{n}_proj.{p}": s
            for n in "qkv"
            for p, s in (("weight", (w, w)), ("bias", (w,)))
        }
    )
    for i in range(num_layers_run(v.depth, v.select_layer), v.depth):
        for name, shape in block.items():
            out[f"{VISION_PREFIX}encoder.layers.{i}.{name}"] = np.zeros(shape, dtype)
    if model_cfg.projector.kind == "linear":
        out[f"{PROJECTOR_PREFIX}linear_2.weight"] = np.eye(e, dtype=dtype)
        out[f"{PROJECTOR_PREFIX}linear_2.bias"] = np.zeros(e, dtype)
    kind = text_kind(model_cfg)
    moe_at = moe_layer_indices(d.moe_layers, d.num_layers)
    for i in range(d.num_layers):
        layer = f"{DECODER_PREFIX}layers.{i}."
        if kind in ("llama", "qwen3", "qwen3_moe") and d.qkv_bias:
            out[f"{layer}self_attn.o_proj.bias"] = np.zeros(e, dtype)
        if kind == "qwen2_moe" and i in moe_at:
            out[f"{layer}mlp.shared_expert.gate_proj.weight"] = np.zeros((0, e), dtype)
            out[f"{layer}mlp.shared_expert.up_proj.weight"] = np.zeros((0, e), dtype)
            out[f"{layer}mlp.shared_expert.down_proj.weight"] = np.zeros((e, 0), dtype)
            out[f"{layer}mlp.shared_expert_gate.weight"] = np.zeros((1, e), dtype)
    return out


def hf_tensors(params: Any, model_cfg: ml_collections.ConfigDict, dtype=None) -> dict:
    """Our params (boxed or not, jax or numpy) -> {HF key: numpy array} of the LLaVA checkpoint."""
    check_exportable(model_cfg)
    flat = traverse_util.flatten_dict(meta.unbox(params), sep="/")
    flat = {k: np.asarray(v) for k, v in flat.items()}
    dtype = np.dtype(dtype) if dtype is not None else flat["decoder/embedding"].dtype
    table = entries(model_cfg)
    unused = sorted(set(flat) - layout.ours_paths(table))
    if unused:
        raise ExportError(f"parameters with no HF place: {unused[:5]}")
    out = {}
    for e in table:
        if e.ours not in flat:
            raise ExportError(f"params have no {e.ours} (needed for {e.hf}); wrong model config?")
        out[e.hf] = layout.to_hf(e, flat[e.ours]).astype(dtype)
    out.update(_constant_tensors(model_cfg, dtype))
    return out


def warn_dropped_tokens(model_cfg: ml_collections.ConfigDict) -> None:
    """Warns when the model drops tokens over capacity: the exported model computes every token."""
    moe, d = model_cfg.moe, model_cfg.decoder
    if moe.dispatch != "capacity" or not moe_layer_indices(d.moe_layers, d.num_layers):
        return
    # capacity = ceil(k * tokens / E * factor) holds every token iff k * factor >= E.
    drops = {
        name: moe[f"capacity_factor_{name}"]
        for name in ("train", "eval")
        if moe.top_k * moe[f"capacity_factor_{name}"] < moe.num_experts
    }
    if drops:
        warnings.warn(
            f"the model uses capacity dispatch and drops tokens over capacity (top_k={moe.top_k}, "
            f"{moe.num_experts} experts, capacity factors {drops}); transformers computes every "
            "routed token, so "
            + (
                "its outputs differ from moe_lvlm.generate / evaluate wherever a token is dropped"
                if "eval" in drops
                else "it matches moe_lvlm.generate / evaluate (no drops at the eval factor) but "
                "not the training forward"
            ),
            stacklevel=2,
        )


# --------------------------------------------------------------------------- tokenizer
def check_tokenizer(tok: Tokenizer, model_cfg: ml_collections.ConfigDict) -> None:
    """The tokenizer must be the one the model was trained with (ids within its vocabulary)."""
    if tok.vocab_size > model_cfg.decoder.vocab_size:
        raise ExportError(
            f"tokenizer {tok.name} has {tok.vocab_size} pieces, more than the model's "
            f"decoder.vocab_size={model_cfg.decoder.vocab_size}; export with the run's tokenizer"
        )
    if tok.image_token_id != model_cfg.image_token_id:
        raise ExportError(
            f"tokenizer {tok.name} has {IMAGE_TOKEN} at id {tok.image_token_id}, the model "
            f"image_token_id={model_cfg.image_token_id}; export with the run's tokenizer"
        )


def _image_processor_file(model_cfg: ml_collections.ConfigDict, aspect: str, out: Path) -> None:
    """LlavaImageProcessor settings that preprocess as the data pipeline does (moe_lvlm/data/
    image.py): optional pad-to-square with the mean colour, shortest-side bicubic resize, centre
    crop, rescale, normalise."""
    v = model_cfg.vision
    size = v.image_size
    image = dict(
        image_processor_type="LlavaImageProcessor",
        do_pad=aspect == "pad",
        do_resize=True,
        size={"shortest_edge": size},
        resample=3,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(v.mean),
        image_std=list(v.std),
        do_convert_rgb=True,
    )
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))


def _processor_file(model_cfg: ml_collections.ConfigDict, out: Path) -> None:
    """LlavaProcessor settings: how many image tokens each `<image>` expands to."""
    v = model_cfg.vision
    processor = dict(
        processor_class="LlavaProcessor",
        patch_size=v.patch_size,
        vision_feature_select_strategy="full"
        if (v.keep_class_token or not v.class_token)
        else "default",
        num_additional_image_tokens=int(v.class_token),
        image_token=IMAGE_TOKEN,
    )
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))


def export(
    params: Any,
    model_cfg: ml_collections.ConfigDict,
    out_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    aspect: str = "pad",
    dtype: str | None = None,
    max_shard_bytes: int = 2 << 30,
    template: str = "",
) -> Path:
    """Writes config.json, safetensors shards, image preprocessor settings and, with `tokenizer`
    (whose ids the model was trained on), tokenizer, processor and generation files into `out_dir`.

    `aspect` is the run's `data.aspect` ('pad' or 'resize'), `template` its `data.template`
    ('chatml' makes `<|im_end|>` an eos id); `dtype` ('float32', 'bfloat16', ...) casts the
    weights, None keeps the params' dtype. Embedding rows beyond the tokenizer are listed in
    generation_config.json's `suppress_tokens`, so HF never generates an id without a piece.
    """
    if aspect not in ASPECT_MODES:
        raise ExportError(f"aspect={aspect!r} is not one of {ASPECT_MODES} (the run's data.aspect)")
    out = Path(out_dir)
    tensors = hf_tensors(params, model_cfg, dtype)
    if tokenizer is not None:
        check_tokenizer(tokenizer, model_cfg)
    out.mkdir(parents=True, exist_ok=True)
    warn_dropped_tokens(model_cfg)
    special = hf_tokenizer.write_tokenizer(tokenizer, out, template) if tokenizer else {}
    dtype_name = str(next(iter(tensors.values())).dtype)
    config = llava_config(model_cfg, special, dtype_name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _image_processor_file(model_cfg, aspect, out)
    if special:
        generation = dict(special, do_sample=False)
        unused = range(tokenizer.vocab_size, model_cfg.decoder.vocab_size)
        if unused:
            generation["suppress_tokens"] = list(unused)
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
        _processor_file(model_cfg, out)
    write_checkpoint(tensors, out, max_shard_bytes)
    return out
