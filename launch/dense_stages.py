"""Sharing the dense stages of a sweep (`launch/sweep.py --share-dense-stages`).

A stage that trains the dense model (before upcycling: vision pre-training, stages I and II of
MoE-tuning) is the same run for two sweep points of one seed when everything it depends on is
equal: every config field outside `model`, `stages` and the stage sections, the dense variant of
the model (without `model.moe`, which no dense layer reads), and the stage's own section and the
stage it starts from. An axis that changes only the MoE layers (experts, top_k, placement,
dispatch, combine weights) leaves them equal; one that changes the stages (the stage recipe)
does not, and is refused. The other points then start from a copy of the first point's finished
dense stages and train only their MoE stages.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import ml_collections
from etils import epath

from moe_lvlm.config import stage_sections
from moe_lvlm.train.stages import dense_variant, is_upcycled, source_stage

# Files of the demo's vision-tower pre-training (moe_lvlm/train/vision_pretrain.py).
TOWER_FILES = ("vision_pretrain.npz", "vision_pretrain.json")


def stage_list(cfg: ml_collections.ConfigDict) -> list[str]:
    return [s.strip() for s in cfg.stages.split(",") if s.strip()]


def dense_stages(cfg: ml_collections.ConfigDict) -> list[str]:
    """The stages of `cfg` that train the dense model (no upcycling along their init chain)."""
    names = stage_list(cfg)
    return [s for s in names if not is_upcycled(cfg, names, s)]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def dense_view(cfg: ml_collections.ConfigDict, stages: Sequence[str]) -> dict[str, Any]:
    """Every config value that the dense `stages` of `cfg` depend on, flattened."""
    names = stage_list(cfg)
    skip = {"model", "stages", *stage_sections(cfg)}
    view = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    model = dense_variant(cfg.model).to_dict()
    model.pop("moe", None)
    view["model"] = model
    for stage in stages:
        view[stage] = {**cfg[stage].to_dict(), "starts_from": source_stage(cfg, names, stage)}
    return _flat(json.loads(json.dumps(view)))


def shared_stages(first: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
                  first_name: str, name: str) -> list[str]:
    """The dense stages of `cfg` (point `name`), all of which point `first_name` trains the same
    way; raises ValueError, one line naming a differing field, when any is trained otherwise."""
    stages = dense_stages(cfg)
    missing = [s for s in stages if s not in dense_stages(first)]
    if missing:
        raise ValueError(
            f"--share-dense-stages: {name} trains dense stage(s) {missing} that {first_name} "
            "does not train as dense stages; run this sweep without --share-dense-stages")
    mine, theirs = dense_view(cfg, stages), dense_view(first, stages)
    changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if changed:
        key = changed[0]
        raise ValueError(
            f"--share-dense-stages: {name} trains its dense stages {stages} otherwise than "
            f"{first_name} ({key}: {theirs.get(key)!r} -> {mine.get(key)!r}); run this sweep "
            "without --share-dense-stages")
    return stages


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
    if "://" not in os.fspath(src) and "://" not in os.fspath(dst):
        shutil.copytree(os.fspath(src), os.fspath(dst))
        return
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            _copy_tree(item, dst / item.name)
        else:
            item.copy(dst / item.name)


def copy_dense(src: str, dst: str, stages: Sequence[str]) -> list[str]:
    """Copies the finished dense `stages` (their folders) and the vision pre-training of run
    `src` into run `dst`, leaving what `dst` already has; returns what it copied. The config is
    not copied: `dst` writes its own, and with no config.json there nothing is checked against
    (moe_lvlm/train/resume.py); its training then skips the complete stages."""
    src_path, dst_path = epath.Path(src), epath.Path(dst)
    dst_path.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in [*TOWER_FILES, *stages]:
        source, target = src_path / name, dst_path / name
        if not source.exists() or target.exists():
            continue
        if source.is_dir():
            partial = dst_path / f".{name}.copying"
            if partial.exists():
                partial.rmtree()
            _copy_tree(source, partial)
            partial.rename(target)
        else:
            source.copy(target)
        copied.append(name)
    return copied
