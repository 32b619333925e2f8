"""Import HF checkpoints (config.json + safetensors, no hub, no torch) into this project.

  import_decoder(dir)  Llama, Mistral, Qwen2 (qkv bias), Qwen3 (qk-norm) causal LMs, and the MoE
                       text models export writes (qwen2_moe, qwen3_moe, mixtral)
  import_vision(dir)   CLIPVisionModel, CLIPModel (its vision half), SiglipVisionModel, SiglipModel
  import_llava(dir)    a LlavaForConditionalGeneration directory, e.g. one written by export
  with_pretrained(model_cfg, llm_dir, vision_dir)   what `config.init.llm/vision` do at stage I

Each returns (model config, params): the model config is a full `config.model` section (the preset
`tiny()` with the imported parts replaced) and params a nested dict of numpy arrays under
'vision', 'projector' and 'decoder' as `build_model(cfg).init` lays them out (unboxed). Tensors keep
their stored dtype (BF16 checkpoints give ml_dtypes.bfloat16 arrays); training casts them.
A missing or mis-shaped tensor, or an architecture feature this model lacks, raises CheckpointError
naming the file and key.
"""

import copy
import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from moe_lvlm import presets as models
from moe_lvlm.cli import UserError
from moe_lvlm.config import moe_layer_indices, num_image_tokens
from moe_lvlm.interop import layout
from moe_lvlm.interop.safetensors_io import Checkpoint
from moe_lvlm.models import lvlm as lvlm_lib
from moe_lvlm.models.decoder import VARIANT_DEFAULTS
from moe_lvlm.models.vit import num_layers_run

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral")
# Decoders that are options of the one block: StableLM(-2), Phi(-2), Qwen-1 ('qwen', remote code).
VARIANT_TYPES = ("stablelm", "phi", "qwen")
DECODER_TYPES = LLAMA_TYPES + VARIANT_TYPES
# Key family (layout.FAMILIES) of each importable decoder type.
FAMILY = {"phi": "phi", "qwen": "qwen1"}
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)
# transformers' defaults for the config fields that released config.json files often leave out.
VISION_DEFAULTS = {
    "clip_vision_model": dict(
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        image_size=224,
        patch_size=32,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
    ),
    "siglip_vision_model": dict(
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        image_size=224,
        patch_size=16,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
    ),
}
DECODER_DEFAULTS = dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False)
ROPE_THETA_DEFAULT = {"mixtral": 1e6}


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be imported; the message names the file, key and reason."""


# --------------------------------------------------------------------------- configs
def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; point at a HF model directory (save_pretrained)"
        )
    return json.loads(path.read_text())


def _field(cfg: dict, key: str, where: str, defaults: dict | None = None):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if defaults and key in defaults:
        return defaults[key]
    raise CheckpointError(f"{where}: config has no {key!r}")


def _rope(cfg: dict, where: str) -> tuple[float, float]:
    """(RoPE base, rotary fraction) from transformers 5 `rope_parameters` or 4.x `rope_theta` /
    `rope_scaling` / `partial_rotary_factor` (StableLM-epoch's `rope_pct`, Qwen-1's
    `rotary_emb_base` / `rotary_pct`)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise CheckpointError(
            f"{where}: rope_type={rope_type!r} (scaled RoPE) is not implemented by this decoder; "
            "only plain RoPE ('default') imports exactly"
        )
    fraction = params.get("partial_rotary_factor")
    for key in ("partial_rotary_factor", "rope_pct", "rotary_pct"):
        fraction = cfg[key] if fraction is None and cfg.get(key) is not None else fraction
    if fraction is None:
        fraction = {"stablelm": 0.25, "phi": 0.5}.get(cfg["model_type"], 1.0)
    theta = params.get("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base")))
    theta = theta if theta is not None else ROPE_THETA_DEFAULT.get(cfg["model_type"], 1e4)
    return float(theta), float(fraction)


def named_moe_layers(indices: list[int], num_layers: int) -> Any:
    """The config spelling of a set of MoE layers: a name when one matches, else the list."""
    indices = sorted(indices)
    for name in ("none", "all", "every_other", "first_half", "second_half"):
        if list(moe_layer_indices(name, num_layers)) == indices:
            return name
    return indices


def decoder_config(cfg: dict, where: str) -> tuple[ml_collections.ConfigDict, dict]:
    """HF text config -> (our decoder section, MoE routing updates; {} for a dense model)."""
    kind = cfg.get("model_type")
    if kind not in DECODER_TYPES:
        raise CheckpointError(
            f"{where}: model_type {kind!r} is not an importable decoder {DECODER_TYPES}"
        )
    if kind in VARIANT_TYPES:
        return variant_decoder_config(cfg, where), {}
    get = lambda key: _field(cfg, key, where, DECODER_DEFAULTS)  # noqa: E731
    if get("hidden_act") != "silu":
        raise CheckpointError(
            f"{where}: hidden_act={get('hidden_act')!r}; the decoder's FFN is SwiGLU"
        )
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=True; the decoder's FFNs have no bias")
    if kind in ("mistral", "mixtral") and cfg.get("sliding_window"):
        warnings.warn(
            f"{where}: sliding_window={cfg['sliding_window']} is ignored (full causal attention); "
            "outputs are exact for sequences up to that length",
            stacklevel=2,
        )
    if kind in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and cfg.get("use_sliding_window"):
        raise CheckpointError(f"{where}: use_sliding_window=True is not supported")
    heads, layers = get("num_attention_heads"), get("num_hidden_layers")
    qkv_bias = {"qwen2": True, "qwen2_moe": cfg.get("qkv_bias", True)}.get(
        kind, bool(cfg.get("attention_bias", False))
    )
    theta, fraction = _rope(cfg, where)
    if fraction != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor={fraction} in a {kind} model")
    dec = ml_collections.ConfigDict(
        dict(
            **VARIANT_DEFAULTS,
            vocab_size=get("vocab_size"),
            embed_dim=get("hidden_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or get("hidden_size") // heads,
            mlp_dim=get("intermediate_size"),
            rope_theta=theta,
            norm_eps=float(get("rms_norm_eps")),
            qkv_bias=bool(qkv_bias),
            qk_norm=kind in ("qwen3", "qwen3_moe"),
            tie_embeddings=bool(get("tie_word_embeddings")),
            moe_layers="none",
        )
    )
    if kind in ("qwen2_moe", "qwen3_moe"):
        only = set(cfg.get("mlp_only_layers") or [])
        step = cfg.get("decoder_sparse_step", 1)
        moe_at = [i for i in range(layers) if i not in only and (i + 1) % step == 0]
        if cfg.get("num_experts", 0) == 0:
            moe_at = []
        if moe_at and get("moe_intermediate_size") != dec.mlp_dim and len(moe_at) < layers:
            raise CheckpointError(
                f"{where}: moe_intermediate_size={cfg['moe_intermediate_size']} differs from "
                f"intermediate_size={dec.mlp_dim}; experts and dense FFNs share one size here"
            )
        if moe_at:
            dec.mlp_dim = get("moe_intermediate_size")
        dec.moe_layers = named_moe_layers(moe_at, layers)
        # norm_topk_prob: the top-k weights over their sum, else the raw probabilities.
        combine = "renorm_chosen" if cfg.get("norm_topk_prob", False) else "softmax"
        moe = dict(num_experts=cfg.get("num_experts", 0), top_k=cfg.get("num_experts_per_tok", 0),
                   combine_weights=combine)
        return dec, (moe if moe_at else {})
    if kind == "mixtral":
        dec.moe_layers = "all"
        return dec, dict(num_experts=get("num_local_experts"), top_k=get("num_experts_per_tok"),
                         combine_weights="renorm_chosen")
    return dec, {}


def variant_decoder_config(cfg: dict, where: str) -> ml_collections.ConfigDict:
    """StableLM(-2) / StableLM-epoch, Phi(-2) or Qwen-1 config -> our decoder section (dense)."""
    kind = cfg["model_type"]
    get = lambda key, default=None: _field(  # noqa: E731
        cfg, key, where, None if default is None else {key: default}
    )
    theta, fraction = _rope(cfg, where)
    heads, hidden = get("num_attention_heads"), get("hidden_size")
    act = get("hidden_act", "gelu_new" if kind == "phi" else "silu")
    if kind == "phi" and act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act={act!r} has no equivalent here")
    if kind != "phi" and act != "silu":
        raise CheckpointError(f"{where}: hidden_act={act!r}; the {kind} FFN is SwiGLU")
    if cfg.get("qk_layernorm"):
        raise CheckpointError(f"{where}: qk_layernorm=True (per-head LayerNorm) is not supported")
    if kind == "qwen" and not cfg.get("no_bias", True):
        raise CheckpointError(f"{where}: no_bias=False (biased MLP/c_proj) is not supported")
    eps_key = {"stablelm": "layer_norm_eps", "phi": "layer_norm_eps", "qwen": "layer_norm_epsilon"}
    eps = cfg.get(eps_key[kind], cfg.get("norm_eps"))  # norm_eps: StableLM-epoch
    dec = dict(
        VARIANT_DEFAULTS,
        vocab_size=get("vocab_size"),
        embed_dim=hidden,
        num_layers=get("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("kv_channels") or hidden // heads,
        # Qwen-1's intermediate_size counts both halves of its SwiGLU (w1 and w2).
        mlp_dim=get("intermediate_size") // (2 if kind == "qwen" else 1),
        rope_theta=theta,
        rotary_fraction=fraction,
        norm_eps=float(eps if eps is not None else (1e-6 if kind == "qwen" else 1e-5)),
        qkv_bias=kind != "stablelm" or bool(cfg.get("use_qkv_bias", False)),
        qk_norm=False,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        moe_layers="none",
        norm="rms" if kind == "qwen" else "layer",
        parallel_block=kind == "phi" or bool(cfg.get("use_parallel_residual", False)),
    )
    if kind == "phi":
        dec.update(ffn="mlp", activation=ACTIVATIONS[act], out_bias=True, head_bias=True)
    return ml_collections.ConfigDict(dec)


def vision_config(
    cfg: dict, where: str, select_layer: int, keep_class_token: bool, directory: Path | None = None
) -> ml_collections.ConfigDict:
    """HF CLIP/SigLIP vision config -> our vision section (LLaVA's layer choice given)."""
    kind = cfg.get("model_type")
    if kind not in VISION_TYPES:
        raise CheckpointError(f"{where}: model_type {kind!r} is not an importable vision tower")
    get = lambda key: _field(cfg, key, where, VISION_DEFAULTS[kind])  # noqa: E731
    act = get("hidden_act")
    if act not in ACTIVATIONS:
        raise CheckpointError(
            f"{where}: hidden_act={act!r} has no equivalent in {sorted(ACTIVATIONS)}"
        )
    clip = kind == "clip_vision_model"
    mean, std = (models.CLIP_MEAN, models.CLIP_STD) if clip else (SIGLIP_MEAN_STD, SIGLIP_MEAN_STD)
    preprocessor = directory / "preprocessor_config.json" if directory else None
    if preprocessor is not None and preprocessor.exists():
        pre = json.loads(preprocessor.read_text())
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    vis = models.tiny().vision
    vis.update(
        image_size=get("image_size"),
        patch_size=get("patch_size"),
        width=get("hidden_size"),
        depth=get("num_hidden_layers"),
        num_heads=get("num_attention_heads"),
        mlp_dim=get("intermediate_size"),
        activation=ACTIVATIONS[act],
        class_token=clip,
        pre_norm=clip,
        patch_bias=not clip,
        select_layer=select_layer,
        keep_class_token=keep_class_token and clip,
        layer_norm_eps=float(get("layer_norm_eps")),
        moe_layers="none",
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )
    return vis


def _vision_section(cfg: dict) -> dict:
    kind = cfg.get("model_type")
    if kind in ("clip", "siglip"):
        return {"model_type": f"{kind}_vision_model", **cfg.get("vision_config", {})}
    return cfg


# --------------------------------------------------------------------------- parameters
def param_shapes(model_cfg: ml_collections.ConfigDict, images: bool = True) -> dict[str, tuple]:
    """'/'-joined path -> shape of every parameter `build_model(model_cfg).init` creates."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.image_token_id = max(cfg.image_token_id, 0)
    model = lvlm_lib.build_model(cfg)
    n = num_image_tokens(cfg) if images else 1
    ids = jnp.zeros((1, n), jnp.int32)
    args = [ids, ids, ids + 1]
    if images:
        v = cfg.vision
        args.append(jnp.zeros((1, 1, v.image_size, v.image_size, 3), jnp.float32))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    return {k: tuple(getattr(v, "value", v).shape) for k, v in params.items()}


def load_entries(
    ckpt: Checkpoint, entries: list[layout.Entry], shapes: dict[str, tuple]
) -> dict[str, np.ndarray]:
    """Reads every entry, checking shapes against the model's; returns flat '/'-paths -> arrays."""
    out, experts = {}, defaultdict(dict)
    for e in entries:
        if e.hf not in ckpt:
            raise CheckpointError(f"{ckpt.directory}: tensor {e.hf} is missing (it gives {e.ours})")
        if e.ours not in shapes:
            raise CheckpointError(
                f"{ckpt.directory}: {e.hf} maps to {e.ours}, which the model lacks"
            )
        want, have = layout.hf_shape(e, shapes[e.ours]), ckpt.shape(e.hf)
        if e.rows:
            want = (e.rows[2], *want[1:])
        if have != want:
            raise CheckpointError(
                f"{ckpt.file_of(e.hf)}: tensor {e.hf} has shape {have}, expected "
                f"{want} for {e.ours} {shapes[e.ours]} (check config.json against the weights)"
            )
        tensor = ckpt[e.hf][e.rows[0] : e.rows[1]] if e.rows else ckpt[e.hf]
        if e.kind == "expert":
            experts[e.ours][e.expert] = tensor
        else:
            out[e.ours] = layout.from_hf(e, tensor, shapes[e.ours])
    for path, parts in experts.items():
        out[path] = np.stack([parts[i].T for i in range(len(parts))])
    return out


def check_zero(ckpt: Checkpoint, key: str, why: str) -> None:
    """Tensors this model cannot represent import only when they are zero (no effect)."""
    if key in ckpt and np.any(np.asarray(ckpt[key], np.float32) != 0):
        raise CheckpointError(f"{ckpt.file_of(key)}: tensor {key} is non-zero; {why}")


def _decoder_extras(ckpt: Checkpoint, dec, prefix: str) -> None:
    for i in range(dec.num_layers):
        layer = f"{prefix}layers.{i}."
        check_zero(
            ckpt, f"{layer}self_attn.o_proj.bias", "the decoder has no attention output bias"
        )
        for name in ("gate_proj", "up_proj", "down_proj"):
            check_zero(ckpt, f"{layer}mlp.shared_expert.{name}.weight", "no shared expert here")


def _nest(flat: dict[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def _decoder_prefixes(ckpt: Checkpoint, llava: bool, family: str = "llama") -> tuple[str, str]:
    """(decoder key prefix, LM head key) in the layout the checkpoint uses."""
    options = (
        [
            ("language_model.model.", "language_model.lm_head.weight"),
            ("model.language_model.", "lm_head.weight"),
        ]
        if llava
        else [("transformer." if family == "qwen1" else "model.", "lm_head.weight")]
    )
    embed = layout.FAMILIES[family].embed
    for prefix, head in options:
        if f"{prefix}{embed}.weight" in ckpt:
            return prefix, head
    raise CheckpointError(
        f"{ckpt.directory}: no {options[0][0]}{embed}.weight; not a decoder checkpoint"
    )


def _vision_prefix(ckpt: Checkpoint, candidates: tuple[str, ...]) -> str:
    for prefix in candidates:
        if f"{prefix}embeddings.patch_embedding.weight" in ckpt:
            return prefix
    raise CheckpointError(
        f"{ckpt.directory}: no vision tower tensors (looked for "
        f"{[c + 'embeddings.patch_embedding.weight' for c in candidates]})"
    )


def import_decoder(directory: str | Path) -> tuple[ml_collections.ConfigDict, dict]:
    """A HF causal LM directory -> (model config with its decoder (+moe) section, params)."""
    directory = Path(directory)
    where = str(directory / "config.json")
    hf = read_config(directory)
    dec, moe = decoder_config(hf, where)
    model_cfg = models.tiny()
    model_cfg.decoder = dec
    model_cfg.moe.update(moe)
    ckpt = Checkpoint(directory)
    family = FAMILY.get(hf["model_type"], "llama")
    prefix, head = _decoder_prefixes(ckpt, llava=False, family=family)
    style = "mixtral" if hf["model_type"] == "mixtral" else "qwen"
    entries = layout.decoder_entries(
        dec, model_cfg.moe.num_experts, prefix, head, style, family=family
    )
    _decoder_extras(ckpt, dec, prefix)
    flat = load_entries(ckpt, entries, param_shapes(model_cfg, images=False))
    return model_cfg, _nest(flat)


def import_vision(
    directory: str | Path, select_layer: int = -2, keep_class_token: bool = False
) -> tuple[ml_collections.ConfigDict, dict]:
    """A HF CLIP/SigLIP directory -> (model config with its vision section, vision params).

    Only the blocks up to `select_layer` (HF hidden_states index) are read; later blocks, the
    post-layernorm and pooling heads do not affect the selected features and are skipped.
    """
    directory = Path(directory)
    where = str(directory / "config.json")
    hf = _vision_section(read_config(directory))
    model_cfg = models.tiny()
    model_cfg.vision = vision_config(hf, where, select_layer, keep_class_token, directory)
    v = model_cfg.vision
    ckpt = Checkpoint(directory)
    prefix = _vision_prefix(ckpt, ("", "vision_model."))
    entries = layout.vision_entries(v, prefix, num_layers_run(v.depth, v.select_layer))
    shapes = {k: s for k, s in param_shapes(model_cfg).items() if k.startswith("vision/")}
    return model_cfg, _nest(load_entries(ckpt, entries, shapes))


def import_llava(directory: str | Path) -> tuple[ml_collections.ConfigDict, dict]:
    """A LlavaForConditionalGeneration directory -> (full model config, all params)."""
    directory = Path(directory)
    where = str(directory / "config.json")
    cfg = read_config(directory)
    if cfg.get("model_type") != "llava":
        raise CheckpointError(f"{where}: model_type {cfg.get('model_type')!r} is not 'llava'")
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(
            f"{where}: vision_feature_layer={layer} (several layers) is not supported"
        )
    strategy = cfg.get("vision_feature_select_strategy", "default")
    vision_hf = cfg.get("vision_config") or {}
    if strategy == "default" and vision_hf.get("model_type") == "siglip_vision_model":
        raise CheckpointError(
            f"{where}: vision_feature_select_strategy='default' drops SigLIP's first patch "
            "token; only 'full' is supported"
        )
    model_cfg = models.tiny()
    model_cfg.vision = vision_config(vision_hf, where, layer, strategy == "full", directory)
    model_cfg.decoder, moe = decoder_config(cfg.get("text_config") or {}, where)
    model_cfg.moe.update(moe)
    model_cfg.image_token_id = int(
        _field(cfg, "image_token_index", where, {"image_token_index": 32000})
    )
    act = cfg.get("projector_hidden_act", "gelu")
    ckpt = Checkpoint(directory)
    legacy = "multi_modal_projector.linear_1.weight" in ckpt
    proj_prefix = "multi_modal_projector." if legacy else "model.multi_modal_projector."
    if act == "linear":
        model_cfg.projector.kind = "linear"
        _check_identity(ckpt, f"{proj_prefix}linear_2.")
    elif act != "gelu":
        raise CheckpointError(
            f"{where}: projector_hidden_act={act!r}; the projector uses exact GELU"
        )
    shapes = param_shapes(model_cfg)
    v, dec = model_cfg.vision, model_cfg.decoder
    prefix, head = _decoder_prefixes(ckpt, llava=True)
    vprefix = "vision_tower." if legacy else "model.vision_tower."
    text_type = cfg["text_config"]["model_type"]
    style = "mixtral" if text_type == "mixtral" else "qwen"
    entries = (
        layout.vision_entries(v, vprefix, num_layers_run(v.depth, v.select_layer))
        + layout.projector_entries(model_cfg.projector.kind, proj_prefix)
        + layout.decoder_entries(
            dec, model_cfg.moe.num_experts, prefix, head, style, FAMILY.get(text_type, "llama")
        )
    )
    _decoder_extras(ckpt, dec, prefix)
    flat = {}
    if not cfg.get("multimodal_projector_bias", True):  # HF has no bias: ours are zero
        entries = [e for e in entries if not (e.hf.startswith(proj_prefix) and "bias" in e.hf)]
        flat = {
            k: np.zeros(s, np.float32)
            for k, s in shapes.items()
            if k.startswith("projector/") and k.endswith("bias")
        }
    flat.update(load_entries(ckpt, entries, shapes))
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise CheckpointError(f"{directory}: no tensors for {missing[:5]}")
    return model_cfg, _nest(flat)


def _check_identity(ckpt: Checkpoint, prefix: str) -> None:
    weight, bias = ckpt[f"{prefix}weight"], ckpt.get(f"{prefix}bias")
    eye = np.eye(weight.shape[0], dtype=np.float32)
    if (
        weight.shape[0] != weight.shape[1]
        or np.any(np.asarray(weight, np.float32) != eye)
        or (bias is not None and np.any(np.asarray(bias, np.float32) != 0))
    ):
        raise CheckpointError(
            f"{ckpt.file_of(prefix + 'weight')}: projector_hidden_act='linear' imports as a linear "
            f"projector only when {prefix}weight is the identity and its bias zero"
        )


# --------------------------------------------------------------------------- stage I init
def with_pretrained(
    model_cfg: ml_collections.ConfigDict, llm_dir: str | None = None, vision_dir: str | None = None
) -> tuple[ml_collections.ConfigDict, dict]:
    """`model_cfg` with its decoder/vision architecture taken from the pretrained directories,
    and their params (nested, numpy). The run's choices stay: vision.select_layer,
    keep_class_token, the MoE layers (upcycled later), image_token_id, dtypes."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    params: dict = {}
    if llm_dir:
        hf = read_config(llm_dir)
        if decoder_config(hf, str(Path(llm_dir) / "config.json"))[1]:
            raise CheckpointError(
                f"{llm_dir}: a {hf['model_type']} MoE decoder; init.llm takes a dense LLM "
                "(llama, mistral, qwen2, qwen3, stablelm, phi, qwen), which stage III upcycles"
            )
        imported, p = import_decoder(llm_dir)
        imported.decoder.moe_layers = cfg.decoder.moe_layers
        cfg.decoder = imported.decoder
        params.update(p)
    if vision_dir:
        v = cfg.vision
        imported, p = import_vision(vision_dir, v.select_layer, v.keep_class_token)
        imported.vision.moe_layers = v.moe_layers
        cfg.vision = imported.vision
        params.update(p)
    return cfg, params


def grow_vocab(params: dict, vocab_size: int) -> dict:
    """Decoder params with `vocab_size` embedding rows (and LM head columns): the added ones are
    the mean of the pretrained ones, as LLaVA initialises the tokens it adds."""
    decoder = dict(params["decoder"])
    embedding = decoder["embedding"]
    extra = vocab_size - embedding.shape[0]
    if extra < 0:
        raise CheckpointError(
            f"vocab_size={vocab_size} is smaller than the pretrained embedding's "
            f"{embedding.shape[0]} rows"
        )
    mean = embedding.astype(np.float32).mean(0, keepdims=True).astype(embedding.dtype)
    decoder["embedding"] = np.concatenate([embedding, np.repeat(mean, extra, 0)])
    if "lm_head" in decoder:  # [embed, vocab]
        head = decoder["lm_head"]
        mean = head.astype(np.float32).mean(1, keepdims=True).astype(head.dtype)
        decoder["lm_head"] = np.concatenate([head, np.repeat(mean, extra, 1)], 1)
    return {**params, "decoder": decoder}


def pretrained_init(cfg: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, dict]:
    """The run config with `init.llm` / `init.vision` (HF directories, '' for none) applied,
    and the pretrained params (nested numpy; training starts its fresh stages from them).

    The model takes the pretrained architectures (`with_pretrained`). With init.llm, the LLM
    directory's tokenizer (tokenizer.model, tokenizer.json or *.tiktoken) becomes `data.tokenizer`
    unless that is set; a
    directory without one is an error (the built-in tokenizer's ids mean nothing to the LLM). The
    tokenizer may add `<image>`, `<|im_start|>`, `<|im_end|>` to the vocabulary: the embedding
    then grows (`grow_vocab`).
    """
    from moe_lvlm.data import tokenizer as tokenizer_lib  # noqa: PLC0415

    init = cfg.get("init") or ml_collections.ConfigDict()
    llm, vision = init.get("llm") or None, init.get("vision") or None
    out = copy.deepcopy(cfg)
    out.model, params = with_pretrained(cfg.model, llm, vision)
    if llm:
        if not out.data.tokenizer:
            path = tokenizer_lib.find_in_directory(llm)
            if path is None:
                raise CheckpointError(
                    f"init.llm={llm} has no tokenizer (tokenizer.model, tokenizer.json or "
                    "*.tiktoken); set data.tokenizer to the tokenizer this LLM was trained with"
                )
            out.data.tokenizer = str(path)
        vocab = tokenizer_lib.load(out.data.tokenizer).vocab_size
        if vocab > out.model.decoder.vocab_size:
            params = grow_vocab(params, vocab)
            out.model.decoder.vocab_size = vocab
    return out, params
