"""Model FLOP accounting shared by the benchmarks (the issue's convention, not XLA's count).

One training step of the LVLM with the vision tower frozen counts
  6 x activated decoder parameters (non-embedding, experts scaled by top_k / num_experts,
      LM head included) x decoder tokens
+ 6 x layers x seq x embed per decoder token (causal self-attention: QK^T and PV, halved)
+ 6 x projector parameters x image tokens (trained; ~0.1% of the total)
+ 2 x vision parameters x patches (frozen: forward only).
Recomputation (remat) is not counted: these are model FLOPs, not hardware FLOPs.
"""

from collections.abc import Mapping
from typing import Any

import ml_collections
from flax import traverse_util

from moe_lvlm.config import num_patches


def param_counts(params: Mapping[str, Any], top_k: int, num_experts: int) -> dict[str, float]:
    """Parameter counts by part from a params tree (arrays or ShapeDtypeStructs).

    Keys: vision, projector, embedding, decoder_active (experts scaled by top_k / num_experts,
    LM head included, embedding excluded), decoder_total, total.
    """
    counts = dict.fromkeys(
        ("vision", "projector", "embedding", "decoder_active", "decoder_total", "total"), 0.0
    )
    for path, leaf in traverse_util.flatten_dict(dict(params), sep="/").items():
        n = float(_size(leaf))
        counts["total"] += n
        part = path.split("/", 1)[0]
        if part in ("vision", "projector"):
            counts[part] += n
        elif path == "decoder/embedding":
            counts["embedding"] += n
            counts["decoder_total"] += n
        else:
            counts["decoder_total"] += n
            counts["decoder_active"] += n * top_k / num_experts if "/moe/experts/" in path else n
    return counts


def _size(leaf) -> int:
    size = 1
    for dim in leaf.shape:
        size *= dim
    return size


def train_flops_per_step(
    counts: Mapping[str, float], model: ml_collections.ConfigDict, batch: int, seq: int,
    images_per_row: int = 1,
) -> dict[str, float]:
    """Model FLOPs of one training step, by term, and their 'total'."""
    d = model.decoder
    tokens = batch * seq
    patches = batch * images_per_row * num_patches(model.vision)
    terms = {
        "decoder": 6.0 * counts["decoder_active"] * tokens,
        "attention": 6.0 * d.num_layers * seq * d.num_heads * d.head_dim * tokens,
        "projector": 6.0 * counts["projector"] * patches,
        "vision": 2.0 * counts["vision"] * patches,
    }
    terms["total"] = sum(terms.values())
    return terms
