"""Config helpers shared by every part: argument parsing, derived sizes, start-up validation."""

import ml_collections

DISPATCH_MODES = ("dropless", "capacity")
GROUPED_MATMULS = ("auto", "xla", "mosaic", "tiled")
ATTENTIONS = ("auto", "xla", "cudnn", "blockwise")  # moe_lvlm/models/attention.py
PROJECTOR_KINDS = ("mlp2x_gelu", "linear")
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
MESH_AXES = ("data", "fsdp", "expert", "tensor")


class ConfigError(ValueError):
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
    if moe.balance_counts not in ("top1", "topk"):
        raise ConfigError(f"model.moe.balance_counts={moe.balance_counts!r}: use 'top1' or 'topk'")
    for name in ("capacity_factor_train", "capacity_factor_eval"):
        if moe[name] <= 0:
            raise ConfigError(f"model.moe.{name}={moe[name]} must be positive")


def validate_model(model: ml_collections.ConfigDict, expert_axis: int = 1) -> None:
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
    if d.head_dim % 2:
        raise ConfigError(f"model.decoder.head_dim={d.head_dim} must be even for RoPE")
    if model.attention not in ATTENTIONS:
        raise ConfigError(f"model.attention={model.attention!r}: use one of {ATTENTIONS}")
    moe_layer_indices(d.moe_layers, d.num_layers)
    moe_layer_indices(v.moe_layers, v.depth)
    _validate_moe(model.moe, expert_axis)


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Validates a whole run config; returns the resolved mesh shape."""
    shape = resolve_mesh_shape(cfg.mesh, num_devices)
    validate_model(cfg.model, expert_axis=shape[MESH_AXES.index("expert")])
    return shape
