"""What may change when a workdir is trained again (docs/reliability.md, "Resuming").

One rule, checked against the workdir's `config.json` before anything is written:
  - may not change: `model`, `init` and `data.tokenizer` (they define the parameters), and for a
    stage that has checkpoints its `trainable`, `upcycle` and `init_from` (its optimizer state
    and where it started); the run is refused with one line naming the fields;
  - changes with a warning: the data (`data.*` sources, paths, lengths and encoding, each stage's
    `mixture`, `seq_len`, `batch_size`), since the restored data position then points into other
    data;
  - changes freely: everything else (steps, learning rates, logging, checkpointing, mesh,
    nan_policy, the data pipeline's worker and prefetch settings).
"""

import json
from typing import Any

import ml_collections

from moe_lvlm import paths
from moe_lvlm.cli import UserError
from moe_lvlm.config import stage_sections
from moe_lvlm.train.checkpoint import latest_step

FIXED = ("model", "init", "data.tokenizer")
FIXED_ONCE_STARTED = ("trainable", "upcycle", "init_from")
DATA_STAGE_FIELDS = ("mixture", "seq_len", "batch_size")
# Fields added since runs were stored, with the value such a run was trained with: a stored
# config without the field resumes when the new config keeps that value.
ADDED_FIELDS = {"model.moe.drop_policy": "position"}
FREE_DATA_FIELDS = ("data.num_workers", "data.read_threads", "data.prefetch",
                    "data.max_consecutive_skips", "data.bad_records", "data.eval_source")


class ResumeError(UserError):
    """The workdir holds a run of another model: training it with this config is refused."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def _normalised(cfg: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    tree = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg
    return _flat(json.loads(json.dumps(tree)))


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def check_resume(workdir: paths.PathLike, cfg: ml_collections.ConfigDict) -> list[str]:
    """Compares `cfg` with the workdir's stored config; returns warning lines, raises ResumeError
    when a field that may not change differs. A workdir without config.json passes."""
    path = paths.path(workdir) / "config.json"
    if not path.exists():
        return []
    stored = {**ADDED_FIELDS, **_normalised(json.loads(path.read_text()))}
    new = _normalised(cfg)
    changed = sorted(k for k in stored.keys() | new.keys() if stored.get(k) != new.get(k))
    started = [s for s in stage_sections(cfg)
               if latest_step(paths.path(workdir) / s / "checkpoints") is not None]
    fixed = [k for k in changed if any(_under(k, p) for p in FIXED)]
    fixed += [k for k in changed for s in started
              if any(_under(k, f"{s}.{f}") for f in FIXED_ONCE_STARTED)]
    if fixed:
        shown = ", ".join(f"{k}: {stored.get(k)!r} -> {new.get(k)!r}" for k in fixed[:3])
        more = f" and {len(fixed) - 3} more" if len(fixed) > 3 else ""
        raise ResumeError(
            f"{workdir} holds a run of another model or stage setup ({shown}{more}); these "
            "cannot change when a run resumes: use a new --workdir, or the config it was "
            "started with")
    data = [k for k in changed if (_under(k, "data") and not any(
        _under(k, f) for f in FREE_DATA_FIELDS)) or any(
        _under(k, f"{s}.{f}") for s in stage_sections(cfg) for f in DATA_STAGE_FIELDS)]
    return [f"warning: resuming {workdir} with other data: {k}: {stored.get(k)!r} -> "
            f"{new.get(k)!r} (the saved data position refers to the old data)" for k in data]
