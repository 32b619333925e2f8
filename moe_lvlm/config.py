"""Config helpers shared by every part: argument parsing, derived sizes, start-up validation."""

import math
import os
from collections.abc import Collection

import ml_collections

from moe_lvlm.cli import UserError

DISPATCH_MODES = ("dropless", "capacity")
GROUPED_MATMULS = ("auto", "xla", "tiled", "mosaic", "megablox")
EP_DISPATCHES = ("auto", "all_gather", "ragged_a2a", "a2a_buffer")
EXPERT_COMPUTES = ("auto", "routed", "dense", "native")
# MoE routing options (moe_lvlm/presets.py:moe_defaults documents each; moe_lvlm/models/moe.py).
COMBINE_MODES = ("auto", "softmax", "renorm_chosen", "renorm_kept")
NOISE_MODES = ("none", "train", "always")
CAPACITY_GROUPS = ("sequence", "batch_shard")
DROP_POLICIES = ("position", "random")
# moe_lvlm/models/attention.py
ATTENTIONS = ("auto", "xla", "cudnn", "blockwise", "splash", "native")
DENSE_FFNS = ("auto", "xla", "native")  # moe_lvlm/models/layers.py:DenseFeedForward
LM_HEAD_LOSSES = ("auto", "xla", "native")  # moe_lvlm/kernels/native_lm_loss.py
RMS_NORMS = ("auto", "xla", "native")  # moe_lvlm/kernels/native_norm.py
PROJECTOR_KINDS = ("mlp2x_gelu", "linear")
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
MESH_AXES = ("data", "fsdp", "expert", "tensor")
NAN_POLICIES = ("skip", "stop")
BAD_RECORD_MODES = ("skip", "strict")
# Decoder positions a row needs besides its image tokens: template, question and answer.
MIN_TEXT_TOKENS = 16


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message says what to change."""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses big_vision-style `key=value,key2=value2` config arguments over typed defaults."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"config argument {item!r} is not of the form key=value")
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = kind(value)
    return out


def moe_layer_indices(spec, num_layers: int) -> tuple[int, ...]:
    """Which of `num_layers` blocks hold an MoE FFN.

    `spec`: 'every_other' (0, 2, 4, ... as MoE-LLaVA), 'all', 'none', 'first_half', 'second_half',
    or explicit layer indices: a list, or a comma-separated string such as '1,3' (the form a
    `--config.model.decoder.moe_layers=1,3` override of the string field takes).
    """
    named = {
        "every_other": range(0, num_layers, 2),
        "all": range(num_layers),
        "none": range(0),
        "first_half": range(num_layers // 2),
        "second_half": range(num_layers // 2, num_layers),
    }
    if isinstance(spec, str) and spec in named:
        return tuple(named[spec])
    if isinstance(spec, str):
        try:
            spec = [int(i) for i in spec.split(",")]
        except ValueError:
            raise ConfigError(
                f"moe_layers={spec!r} is not one of {sorted(named)} or comma-separated layer "
                "indices such as '1,3'"
            ) from None
    indices = tuple(sorted({int(i) for i in spec}))
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"moe_layers {bad} out of range for {num_layers} layers")
    return indices


def num_patches(vision: ml_collections.ConfigDict) -> int:
    if vision.image_size % vision.patch_size:
        raise ConfigError(
            f"vision.image_size={vision.image_size} is not a multiple of "
            f"vision.patch_size={vision.patch_size}"
        )
    return (vision.image_size // vision.patch_size) ** 2


def num_image_tokens(model: ml_collections.ConfigDict) -> int:
    """How many decoder positions one image fills (the `<image>` placeholder expands to this)."""
    keep_cls = model.vision.class_token and model.vision.keep_class_token
    return num_patches(model.vision) + int(keep_cls)


def resolve_mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Mesh sizes in MESH_AXES order with the single -1 replaced by what is left of the devices."""
    sizes = [int(mesh[a]) for a in MESH_AXES]
    free = [a for a, s in zip(MESH_AXES, sizes, strict=True) if s == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh axes {free} are all -1; at most one axis can take the rest")
    bad = [f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True) if s == 0 or s < -1]
    if bad:
        raise ConfigError(f"mesh sizes must be positive or -1, got {', '.join(bad)}")
    fixed = 1
    for s in sizes:
        fixed *= s if s > 0 else 1
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"the fixed mesh axes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices; change the mesh sizes so that their product divides it"
            )
        sizes[MESH_AXES.index(free[0])] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} has {fixed} devices but "
            f"{num_devices} are available; set one axis to -1 or make the product {num_devices}"
        )
    return tuple(sizes)


def _validate_moe(moe: ml_collections.ConfigDict, expert_axis: int) -> None:
    if moe.dispatch not in DISPATCH_MODES:
        raise ConfigError(
            f"model.moe.dispatch={moe.dispatch!r} is unknown; use one of {DISPATCH_MODES}"
        )
    if moe.grouped_matmul not in GROUPED_MATMULS:
        raise ConfigError(
            f"model.moe.grouped_matmul={moe.grouped_matmul!r} is unknown; use one of "
            f"{GROUPED_MATMULS}"
        )
    if moe.get("ep_dispatch", "auto") not in EP_DISPATCHES:
        raise ConfigError(
            f"model.moe.ep_dispatch={moe.ep_dispatch!r} is unknown; use one of {EP_DISPATCHES}"
        )
    if moe.get("expert_compute", "auto") not in EXPERT_COMPUTES:
        raise ConfigError(
            f"model.moe.expert_compute={moe.expert_compute!r} is unknown; use one of "
            f"{EXPERT_COMPUTES}"
        )
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ConfigError(
            f"model.moe.top_k={moe.top_k} must be between 1 and "
            f"model.moe.num_experts={moe.num_experts}"
        )
    if moe.num_experts % expert_axis:
        raise ConfigError(
            f"model.moe.num_experts={moe.num_experts} is not divisible by mesh expert axis "
            f"{expert_axis}; change mesh.expert or the number of experts"
        )
    for name, allowed in (("combine_weights", COMBINE_MODES),
                          ("second_choice_noise", NOISE_MODES),
                          ("capacity_group", CAPACITY_GROUPS),
                          ("drop_policy", DROP_POLICIES)):
        if moe.get(name, allowed[0]) not in allowed:
            raise ConfigError(f"model.moe.{name}={moe[name]!r} is unknown; use one of {allowed}")
    if moe.top_k == 1 and moe.combine_weights in ("renorm_chosen", "renorm_kept"):
        raise ConfigError(
            f"model.moe.combine_weights={moe.combine_weights!r} with top_k=1 weighs every output "
            "by 1, so the router learns nothing from the loss; use 'softmax' (Switch, DeepSpeed "
            "top1gating) or 'auto'"
        )
    if moe.min_capacity < 0:
        raise ConfigError(f"model.moe.min_capacity={moe.min_capacity} must be >= 0")
    if moe.balance_counts not in ("top1", "topk"):
        raise ConfigError(f"model.moe.balance_counts={moe.balance_counts!r}: use 'top1' or 'topk'")
    for name in ("capacity_factor_train", "capacity_factor_eval"):
        if moe[name] <= 0:
            raise ConfigError(f"model.moe.{name}={moe[name]} must be positive")


def _validate_dense_ffn(model: ml_collections.ConfigDict, tensor_axis: int) -> None:
    choice = model.get("dense_ffn", "auto")
    if choice not in DENSE_FFNS:
        raise ConfigError(f"model.dense_ffn={choice!r}: use one of {DENSE_FFNS}")
    if choice != "native":
        return
    d = model.decoder
    why = None
    if d.get("ffn", "swiglu") != "swiglu" or d.get("activation", "silu") != "silu":
        why = "the decoder's FFN is not SwiGLU (model.decoder.ffn / activation)"
    elif d.embed_dim % 16 or d.mlp_dim % 16:
        why = (f"model.decoder.embed_dim={d.embed_dim} and mlp_dim={d.mlp_dim} must be "
               "multiples of 16")
    elif tensor_axis > 1:
        why = f"mesh tensor axis {tensor_axis} (the kernel needs whole weights)"
    if why:
        raise ConfigError(f"model.dense_ffn='native' cannot run: {why}; use 'auto' (native where "
                          "it can run) or 'xla'")


def _validate_lm_head_loss(model: ml_collections.ConfigDict, tensor_axis: int) -> None:
    choice = model.get("lm_head_loss", "auto")
    if choice not in LM_HEAD_LOSSES:
        raise ConfigError(f"model.lm_head_loss={choice!r}: use one of {LM_HEAD_LOSSES}")
    why = None
    if choice == "native" and model.decoder.embed_dim % 16:
        why = f"model.decoder.embed_dim={model.decoder.embed_dim} must be a multiple of 16"
    elif choice == "native" and tensor_axis > 1:
        why = f"mesh tensor axis {tensor_axis} (the kernel needs the whole head)"
    if why:
        raise ConfigError(f"model.lm_head_loss='native' cannot run: {why}; use 'auto' (native "
                          "where it can run) or 'xla'")
def _validate_rms_norm(model: ml_collections.ConfigDict) -> None:
    choice = model.get("rms_norm", "auto")
    if choice not in RMS_NORMS:
        raise ConfigError(f"model.rms_norm={choice!r}: use one of {RMS_NORMS}")
    if choice != "native":
        return
    if model.decoder.get("norm", "rms") != "rms":
        raise ConfigError("model.rms_norm='native' cannot run: the decoder's norm is LayerNorm "
                          "(model.decoder.norm); use 'auto' or 'xla'")
    from moe_lvlm.kernels import native_norm  # noqa: PLC0415  (imports jax)

    try:
        native_norm.resolve(choice)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate_model(
    model: ml_collections.ConfigDict, expert_axis: int = 1, tensor_axis: int = 1
) -> None:
    """Raises ConfigError naming the field to change when the model config cannot work."""
    v, d = model.vision, model.decoder
    num_patches(v)
    if v.activation not in VISION_ACTIVATIONS:
        raise ConfigError(
            f"model.vision.activation={v.activation!r}: use one of {VISION_ACTIVATIONS}"
        )
    if not -v.depth - 1 <= v.select_layer <= v.depth:
        raise ConfigError(
            f"model.vision.select_layer={v.select_layer} out of range for depth {v.depth} "
            f"(hidden-state index: 0 = embeddings, -1 = last block)"
        )
    if v.width % v.num_heads:
        raise ConfigError(f"model.vision.width={v.width} not divisible by num_heads={v.num_heads}")
    if model.projector.kind not in PROJECTOR_KINDS:
        raise ConfigError(
            f"model.projector.kind={model.projector.kind!r}: use one of {PROJECTOR_KINDS}"
        )
    if d.num_heads % d.num_kv_heads:
        raise ConfigError(
            f"model.decoder.num_heads={d.num_heads} is not a multiple of "
            f"num_kv_heads={d.num_kv_heads}"
        )
    rotary = int(d.head_dim * d.get("rotary_fraction", 1.0))
    if rotary % 2 or rotary == 0:
        raise ConfigError(
            f"model.decoder: head_dim={d.head_dim} * rotary_fraction="
            f"{d.get('rotary_fraction', 1.0)} gives {rotary} rotary features; RoPE needs an even, "
            "non-zero number"
        )
    for key, allowed in (("norm", ("rms", "layer")), ("ffn", ("swiglu", "mlp"))):
        if d.get(key, allowed[0]) not in allowed:
            raise ConfigError(f"model.decoder.{key}={d[key]!r}: use one of {allowed}")
    if model.attention not in ATTENTIONS:
        raise ConfigError(f"model.attention={model.attention!r}: use one of {ATTENTIONS}")
    moe_layer_indices(d.moe_layers, d.num_layers)
    vision_moe = moe_layer_indices(v.moe_layers, v.depth)
    _validate_moe(model.moe, expert_axis)
    _validate_dense_ffn(model, tensor_axis)
    _validate_lm_head_loss(model, tensor_axis)
    _validate_rms_norm(model)
    if model.moe.get("expert_compute", "auto") == "native":
        # The kernel computes SwiGLU experts only (moe_lvlm/kernels/native_moe.py).
        why = None
        if expert_axis > 1:
            why = f"mesh expert axis {expert_axis} (expert parallelism needs 'routed')"
        elif d.get("ffn", "swiglu") != "swiglu" or d.get("activation", "silu") != "silu":
            why = "the decoder's FFN is not SwiGLU (model.decoder.ffn / activation)"
        elif vision_moe or model.projector.get("moe", False):
            why = "the vision tower's or projector's MoE experts are GELU MLPs"
        if why:
            raise ConfigError(f"model.moe.expert_compute='native' cannot run: {why}; use 'auto' "
                              "(native where it can run) or 'routed'")


def validate(
    cfg: ml_collections.ConfigDict, num_devices: int, overrides: Collection[str] = ()
) -> tuple[int, ...]:
    """Validates a whole run config before any work; returns the resolved mesh shape.

    `overrides`: the fields set on the command line (`--config.data.mixture=...`), to reject
    overrides that the config would ignore.
    """
    shape = resolve_mesh_shape(cfg.mesh, num_devices)
    slices = cfg.mesh.get("num_slices", 1)
    if slices < 1 or shape[0] % slices:
        raise ConfigError(
            f"mesh.num_slices={slices} must be >= 1 and divide the data axis (size {shape[0]}): "
            "each slice holds whole data-parallel replicas; make mesh.data a multiple of it"
        )
    validate_model(cfg.model, expert_axis=shape[MESH_AXES.index("expert")],
                   tensor_axis=shape[MESH_AXES.index("tensor")])
    if stage_sections(cfg):  # a training config (not a bare model or base config)
        validate_training(cfg, overrides)
    return shape


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r} is not allowed: {allowed}")


def _positive(section: ml_collections.ConfigDict, prefix: str, *names: str) -> None:
    for name in names:
        value = section[name]
        ok = isinstance(value, int | float) and math.isfinite(value) and value > 0
        _require(ok, f"{prefix}.{name}", value, "it must be a positive number")


def _at_least(section: ml_collections.ConfigDict, prefix: str, name: str, low: int) -> None:
    _require(section[name] >= low, f"{prefix}.{name}", section[name], f"it must be >= {low}")


def _one_of(section: ml_collections.ConfigDict, prefix: str, name: str, allowed) -> None:
    _require(section[name] in allowed, f"{prefix}.{name}", section[name],
             f"use one of {tuple(allowed)}")


def _is_local(path: str) -> bool:
    return "://" not in path


def _check_mixture(field: str, mixture) -> None:
    """Source specs that parse and local files that exist."""
    from moe_lvlm.data import sources  # noqa: PLC0415  (config.py is imported by everything)

    try:
        pairs = sources.parse_mixture(mixture)
    except ValueError as e:
        raise ConfigError(f"{field}={mixture!r}: {e}") from None
    for spec, _ in pairs:
        kind, target, opts = sources.parse_spec(spec)
        paths = {"file": target} if kind == "llava" else {}
        if opts.get("image_root"):
            paths["image_root"] = opts["image_root"]
        for what, path in paths.items():
            if _is_local(path) and not os.path.exists(os.path.expanduser(path)):
                raise ConfigError(f"{field}={mixture!r}: {what} {path} does not exist")


def stage_sections(cfg: ml_collections.ConfigDict) -> list[str]:
    """Names of the config's stage sections (those with a `trainable` field)."""
    return [k for k, v in cfg.items() if isinstance(v, ml_collections.ConfigDict)
            and "trainable" in v]


def validate_training(cfg: ml_collections.ConfigDict, overrides: Collection[str] = ()) -> None:
    """Every field of a training run config that the model validation does not cover."""
    from moe_lvlm.data import conversation, image  # noqa: PLC0415

    sections = stage_sections(cfg)
    names = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    _require(bool(names), "stages", cfg.stages, f"name one or more of {sections}")
    for name in names:
        _require(name in sections, "stages", cfg.stages,
                 f"{name!r} is not a stage section; stage sections: {sections}")
    _one_of(cfg, "config", "nan_policy", NAN_POLICIES)
    _at_least(cfg, "config", "log_every", 1)
    _at_least(cfg.checkpoint, "checkpoint", "every", 1)
    _at_least(cfg.checkpoint, "checkpoint", "max_to_keep", 1)
    data = cfg.data
    _one_of(data, "data", "bad_records", BAD_RECORD_MODES)
    _one_of(data, "data", "template", conversation.TEMPLATES)
    _one_of(data, "data", "aspect", image.ASPECT_MODES)
    for name, low in (("max_images_per_row", 1), ("num_workers", 0), ("read_threads", 1),
                      ("prefetch", 0), ("max_consecutive_skips", 1)):
        if name in data:
            _at_least(data, "data", name, low)
    in_workdir = str(data.tokenizer).startswith("{workdir}")  # checked when loaded, in the workdir
    if data.tokenizer and _is_local(data.tokenizer) and not in_workdir:
        _require(os.path.exists(os.path.expanduser(data.tokenizer)), "data.tokenizer",
                 data.tokenizer, "the file does not exist")
    for name in ("llm", "vision"):
        path = cfg.get("init", {}).get(name, "")
        if path and _is_local(path):
            _require(os.path.isdir(os.path.expanduser(path)), f"init.{name}", path,
                     "the directory does not exist")
    pre = cfg.get("vision_pretrain")
    if pre is not None and pre.steps != 0:
        _at_least(pre, "vision_pretrain", "steps", 0)
        _positive(pre, "vision_pretrain", "batch_size", "lr")
    image_tokens = num_image_tokens(cfg.model)
    uses_data_mixture = False
    for name in names:
        _validate_stage(cfg, name, image_tokens)
        if cfg[name].mixture:
            _check_mixture(f"{name}.mixture", cfg[name].mixture)
        else:
            uses_data_mixture = True
    if uses_data_mixture:
        _check_mixture("data.mixture", data.mixture)
    elif "data.mixture" in overrides:
        own = ", ".join(f"{n}.mixture={cfg[n].mixture!r}" for n in names)
        raise ConfigError(
            f"data.mixture={data.mixture!r} would be ignored: every stage run sets its own "
            f"mixture ({own}); set --config.STAGE.mixture, or --config.STAGE.mixture='' for a "
            "stage to read data.mixture")


def _validate_stage(cfg: ml_collections.ConfigDict, name: str, image_tokens: int) -> None:
    stage = cfg[name]
    _positive(stage, name, "lr")
    _at_least(stage, name, "batch_size", 1)
    _at_least(stage, name, "grad_accum", 1)
    _require(stage.batch_size % stage.grad_accum == 0, f"{name}.batch_size", stage.batch_size,
             f"it must be divisible by {name}.grad_accum={stage.grad_accum}")
    _require(0 <= stage.warmup_fraction <= 1, f"{name}.warmup_fraction", stage.warmup_fraction,
             "it must be between 0 and 1")
    for field in ("final_lr_fraction", "weight_decay", "num_epochs", "seq_len"):
        if field in stage:
            _at_least(stage, name, field, 0)
    _positive(stage, name, "clip_norm")
    if stage.get("num_epochs", 0) <= 0:
        _at_least(stage, name, "num_steps", 1)
    seq_len = stage.get("seq_len", 0) or cfg.data.seq_len
    field = f"{name}.seq_len" if stage.get("seq_len", 0) else "data.seq_len"
    need = image_tokens + MIN_TEXT_TOKENS
    _require(seq_len >= need, field, seq_len,
             f"a row must hold the {image_tokens} image tokens and at least {MIN_TEXT_TOKENS} "
             f"text tokens (question and answer): use >= {need}")
    init_from = stage.get("init_from", "")
    _require(init_from in ("", "none", *[s for s in stage_sections(cfg) if s != name]),
             f"{name}.init_from", init_from,
             "use '' (the previous stage), 'none' (fresh) or another stage section's name")
