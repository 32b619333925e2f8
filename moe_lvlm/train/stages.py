"""What each MoE-tuning stage trains, the model it trains, and upcycling dense FFNs into experts.

Parameters are addressed by '/'-joined paths (`decoder/layers_0/moe/experts/gate`); a stage's
`trainable` is a list of regexes, a parameter trains when one of them matches its path from the
start (`re.match`). Frozen parameters get no optimizer state.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

Params = Mapping[str, Any]


def flatten(params: Params) -> dict[str, Any]:
    return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def is_trainable(path: str, patterns: Sequence[str]) -> bool:
    return any(re.match(p, path) for p in patterns)


def split_trainable(params: Params, patterns: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts whose union is `params`."""
    flat = flatten(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(k, patterns)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return unflatten(trainable), unflatten(frozen)


def merge(trainable: Params, frozen: Params) -> dict:
    return unflatten({**flatten(frozen), **flatten(trainable)})


def check_patterns(params: Params, patterns: Sequence[str], stage: str) -> None:
    """Every pattern must select at least one parameter: a typo would silently freeze a part."""
    paths = list(flatten(params))
    for p in patterns:
        if not any(re.match(p, k) for k in paths):
            raise ValueError(
                f"{stage}: trainable pattern {p!r} matches no parameter; paths look like "
                f"{paths[0]!r}, {paths[-1]!r}"
            )


def dense_variant(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The model before upcycling: every FFN dense."""
    dense = ml_collections.ConfigDict(model.to_dict())
    dense.decoder.moe_layers = "none"
    dense.vision.moe_layers = "none"
    dense.projector.moe = False
    return dense


def source_stage(
    cfg: ml_collections.ConfigDict, stage_names: Sequence[str], name: str
) -> str | None:
    """The stage whose final parameters `name` starts from (its `init_from`), or None (fresh).

    '' means the stage before `name` in `stage_names` (None for the first, or for a stage that is
    not in the list); 'none' means fresh; anything else must name a stage section of `cfg`.
    """
    init_from = cfg[name].get("init_from", "")
    if init_from == "none":
        return None
    if init_from == "":
        i = list(stage_names).index(name) if name in stage_names else 0
        return stage_names[i - 1] if i > 0 else None
    if init_from == name or not isinstance(cfg.get(init_from), ml_collections.ConfigDict) or (
        "trainable" not in cfg[init_from]
    ):
        raise ValueError(
            f"{name}.init_from={init_from!r} is not another stage section of the config; use a "
            "stage name, '' (the previous stage in config.stages) or 'none' (fresh)"
        )
    return init_from


def is_upcycled(cfg: ml_collections.ConfigDict, stage_names: Sequence[str], name: str) -> bool:
    """Whether stage `name` trains the MoE model: it upcycles, or starts from a stage that does."""
    seen = []
    while name is not None:
        if name in seen:
            raise ValueError(f"init_from of stages {seen} forms a cycle")
        seen.append(name)
        if cfg[name].upcycle:
            return True
        name = source_stage(cfg, stage_names, name)
    return False


def stage_model(cfg: ml_collections.ConfigDict, stage_names: Sequence[str], name: str):
    """The model config of stage `name`: MoE once an upcycling stage is reached along its
    `init_from` chain, else the dense variant."""
    return cfg.model if is_upcycled(cfg, stage_names, name) else dense_variant(cfg.model)


def stage_model_config(cfg: ml_collections.ConfigDict, stage_names: Sequence[str], index: int):
    """`stage_model` of `stage_names[index]`."""
    return stage_model(cfg, stage_names, stage_names[index])


_EXPERT_PATH = re.compile(
    r"^(?P<prefix>.*)/moe/experts/(?P<name>gate|up|down|fc1|fc2)(?P<bias>_bias)?$"
)


def unused_paths(dense_params: Params, fresh_moe_params: Params) -> list[str]:
    """Paths of `dense_params` that `upcycle` would not put into `fresh_moe_params`."""
    fresh = flatten(fresh_moe_params)
    used = set(fresh) | {dense_source_path(p) for p in fresh}
    return sorted(p for p in flatten(dense_params) if p not in used)


def dense_source_path(moe_path: str) -> str | None:
    """Where an expert tensor comes from in the dense model, or None (e.g. a fresh router)."""
    m = _EXPERT_PATH.match(moe_path)
    if m is None:
        return None
    leaf = "bias" if m["bias"] else "kernel"
    return f"{m['prefix']}/mlp/{m['name']}/{leaf}"


def upcycle(
    dense_params: Params, fresh_moe_params: Params, noise_std: float, rng: jax.Array
) -> dict:
    """MoE parameters from a dense model: every expert a copy of the dense FFN it replaces.

    `fresh_moe_params` is an initialised MoE model: its routers (and anything the dense model
    lacks) are kept; every other tensor comes from `dense_params`. A part (vision, projector,
    decoder) that `dense_params` lacks altogether keeps its fresh parameters (pretrained
    parameters may cover only some parts). With `noise_std` > 0 each expert copy gets
    independent Gaussian noise of that std.
    """
    dense = flatten(dense_params)
    parts = {path.split("/")[0] for path in dense}
    out = {}
    for i, (path, fresh) in enumerate(sorted(flatten(fresh_moe_params).items())):
        if path.split("/")[0] not in parts:
            out[path] = fresh
            continue
        if path in dense:
            if tuple(dense[path].shape) != tuple(fresh.shape):
                raise ValueError(
                    f"{path}: the source has shape {tuple(dense[path].shape)}, the model "
                    f"{tuple(fresh.shape)}"
                )
            out[path] = jnp.asarray(dense[path], fresh.dtype)
            continue
        source = dense_source_path(path)
        if source is None:
            out[path] = fresh
            continue
        if source not in dense:
            raise ValueError(f"upcycling {path}: the dense model has no {source}")
        copies = jnp.broadcast_to(dense[source], fresh.shape).astype(fresh.dtype)
        if noise_std > 0:
            noise = jax.random.normal(jax.random.fold_in(rng, i), fresh.shape, fresh.dtype)
            copies = copies + noise_std * noise
        out[path] = copies
    return unflatten(out)
