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


def stage_model_config(cfg: ml_collections.ConfigDict, stage_names: Sequence[str], index: int):
    """The model trained by stage `index`: MoE once an upcycling stage has been reached."""
    upcycled = any(cfg[name].upcycle for name in stage_names[: index + 1])
    return cfg.model if upcycled else dense_variant(cfg.model)


_EXPERT_PATH = re.compile(r"^(?P<prefix>.*)/moe/experts/(?P<name>gate|up|down|fc1|fc2)(?P<bias>_bias)?$")


def dense_source_path(moe_path: str) -> str | None:
    """Where an expert tensor comes from in the dense model, or None (e.g. a fresh router)."""
    m = _EXPERT_PATH.match(moe_path)
    if m is None:
        return None
    leaf = "bias" if m["bias"] else "kernel"
    return f"{m['prefix']}/mlp/{m['name']}/{leaf}"


def upcycle(dense_params: Params, fresh_moe_params: Params, noise_std: float, rng: jax.Array) -> dict:
    """MoE parameters from a dense model: every expert a copy of the dense FFN it replaces.

    `fresh_moe_params` is an initialised MoE model: its routers (and anything the dense model
    lacks) are kept; every other tensor comes from `dense_params`. With `noise_std` > 0 each
    expert copy gets independent Gaussian noise of that std.
    """
    dense = flatten(dense_params)
    out = {}
    for i, (path, fresh) in enumerate(sorted(flatten(fresh_moe_params).items())):
        if path in dense:
            out[path] = dense[path]
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
