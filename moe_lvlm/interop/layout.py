"""The one table that maps HF checkpoint keys onto this project's parameter paths, both ways.

Import and export walk the same `Entry` lists, so a round trip is exact by construction. Every
transform is a transpose or reshape:

  linear  ours [*in, *out] (the first `in_dims` axes are inputs) <-> HF nn.Linear [out, in]
  bias    ours [*out] <-> HF [prod(out)]
  patch   ours [p, p, 3, W] (patch row, column, channel) <-> HF Conv2d [W, 3, p, p]
  expert  ours stacked [E, in, out], entry `expert` = e <-> HF per-expert nn.Linear [out, in]
  copy    the same array

An entry with `rows` is that slice (along HF's first axis) of a fused tensor (Qwen-1's c_attn).

HF key names are those `save_pretrained` writes with transformers 5 (checked by tests/interop).
"""

import dataclasses
import math
from collections.abc import Iterable

import ml_collections
import numpy as np

from moe_lvlm.config import moe_layer_indices


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str
    ours: str
    kind: str = "copy"
    in_dims: int = 1
    expert: int = -1
    # (start, stop, total): the entry is rows start:stop of a fused HF tensor of `total` rows.
    rows: tuple[int, int, int] | None = None


def to_hf(entry: Entry, ours: np.ndarray) -> np.ndarray:
    """Our tensor (the whole stacked tensor for an expert entry) -> the HF tensor of `entry`."""
    if entry.kind == "linear":
        n_in = math.prod(ours.shape[: entry.in_dims])
        return ours.reshape(n_in, -1).T
    if entry.kind == "bias":
        return ours.reshape(-1)
    if entry.kind == "patch":
        return ours.transpose(3, 2, 0, 1)
    if entry.kind == "expert":
        return ours[entry.expert].T
    return ours


def hf_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape that `entry` has when our parameter has `shape`."""
    return to_hf(entry, np.empty(shape, np.int8)).shape


def from_hf(entry: Entry, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The HF tensor of a non-expert `entry` -> our tensor of `shape`."""
    if entry.kind == "linear":
        return hf.T.reshape(shape)
    if entry.kind == "bias":
        return hf.reshape(shape)
    if entry.kind == "patch":
        return hf.transpose(2, 3, 1, 0)
    return hf


def vision_entries(v: ml_collections.ConfigDict, prefix: str, num_layers: int) -> list[Entry]:
    """CLIP/SigLIP vision transformer keys (`prefix` + 'embeddings...') for the first blocks."""
    p, out = prefix, []
    out.append(Entry(f"{p}embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "patch"))
    if v.patch_bias:
        out.append(Entry(f"{p}embeddings.patch_embedding.bias", "vision/patch_embed/bias"))
    if v.class_token:
        out.append(Entry(f"{p}embeddings.class_embedding", "vision/cls"))
    out.append(Entry(f"{p}embeddings.position_embedding.weight", "vision/pos_embed"))
    if v.pre_norm:
        out += [
            Entry(f"{p}pre_layrnorm.weight", "vision/pre_norm/scale"),
            Entry(f"{p}pre_layrnorm.bias", "vision/pre_norm/bias"),
        ]
    for i in range(num_layers):
        hf, ours = f"{p}encoder.layers.{i}.", f"vision/layers_{i}/"
        for h, o in (("layer_norm1", "norm1"), ("layer_norm2", "norm2")):
            out += [
                Entry(f"{hf}{h}.weight", f"{ours}{o}/scale"),
                Entry(f"{hf}{h}.bias", f"{ours}{o}/bias"),
            ]
        for name in "qkv":
            out += [
                Entry(f"{hf}self_attn.{name}_proj.weight", f"{ours}attn/{name}/kernel", "linear"),
                Entry(f"{hf}self_attn.{name}_proj.bias", f"{ours}attn/{name}/bias", "bias"),
            ]
        out += [
            Entry(f"{hf}self_attn.out_proj.weight", f"{ours}attn/o/kernel", "linear", in_dims=2),
            Entry(f"{hf}self_attn.out_proj.bias", f"{ours}attn/o/bias"),
        ]
        for fc in ("fc1", "fc2"):
            out += [
                Entry(f"{hf}mlp.{fc}.weight", f"{ours}mlp/{fc}/kernel", "linear"),
                Entry(f"{hf}mlp.{fc}.bias", f"{ours}mlp/{fc}/bias"),
            ]
    return out


# HF names of the SwiGLU projections per MoE flavour: (gate, up, down) of an expert.
EXPERT_NAMES = {"qwen": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}
MOE_BLOCK = {"qwen": "mlp", "mixtral": "block_sparse_moe"}


@dataclasses.dataclass(frozen=True)
class DecoderNames:
    """Key names of one decoder family (after the prefix; layer keys after 'layers.{i}.')."""

    layers: str = "layers"
    embed: str = "embed_tokens"
    attn_norm: str = "input_layernorm"
    ffn_norm: str = "post_attention_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    qkv: str = ""  # a fused [q; k; v] projection (Qwen-1's c_attn) instead of q, k, v
    o: str = "self_attn.o_proj"
    mlp: str = "mlp"
    # Our FFN parameter -> HF module name inside `mlp` (and inside each expert).
    ffn: tuple = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
    final_norm: str = "norm"


FAMILIES = {
    "llama": DecoderNames(),  # also Mistral, Qwen2/3, StableLM
    "phi": DecoderNames(
        o="self_attn.dense", ffn=(("fc1", "fc1"), ("fc2", "fc2")), final_norm="final_layernorm"
    ),
    "qwen1": DecoderNames(
        layers="h",
        embed="wte",
        attn_norm="ln_1",
        ffn_norm="ln_2",
        qkv="attn.c_attn",
        o="attn.c_proj",
        ffn=(("gate", "w2"), ("up", "w1"), ("down", "c_proj")),
        final_norm="ln_f",
    ),
}


def _norm_entries(hf: str, ours: str, layer_norm: bool) -> list[Entry]:
    out = [Entry(f"{hf}.weight", f"{ours}/scale")]
    return out + [Entry(f"{hf}.bias", f"{ours}/bias")] if layer_norm else out


def decoder_entries(
    d: ml_collections.ConfigDict,
    num_experts: int,
    prefix: str,
    head_key: str,
    moe_style: str = "qwen",
    family: str = "llama",
) -> list[Entry]:
    """Decoder keys: `prefix` + 'embed_tokens...' (per `family`), the LM head at `head_key`.

    moe_style: 'qwen' ('mlp.gate', 'mlp.experts.{e}.gate_proj'), 'mixtral'
    ('block_sparse_moe.gate', '...experts.{e}.w1') or 'deepspeed' (MoE-LLaVA:
    'mlp.deepspeed_moe.gate.wg', 'mlp.deepspeed_moe.experts.deepspeed_experts.{e}.<family name>').
    """
    names = FAMILIES[family]
    layer_norm = d.get("norm", "rms") == "layer"
    p, out = prefix, [Entry(f"{prefix}{names.embed}.weight", "decoder/embedding")]
    moe_at = set(moe_layer_indices(d.moe_layers, d.num_layers))
    q_size, kv_size = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    for i in range(d.num_layers):
        hf, ours = f"{p}{names.layers}.{i}.", f"decoder/layers_{i}/"
        out += _norm_entries(f"{hf}{names.attn_norm}", f"{ours}attn_norm", layer_norm)
        if not d.get("parallel_block", False):
            out += _norm_entries(f"{hf}{names.ffn_norm}", f"{ours}ffn_norm", layer_norm)
        for j, name in enumerate("qkv"):
            if names.qkv:
                start = 0 if j == 0 else q_size + (j - 1) * kv_size
                rows = (start, start + (q_size if j == 0 else kv_size), q_size + 2 * kv_size)
                out.append(
                    Entry(
                        f"{hf}{names.qkv}.weight", f"{ours}attn/{name}/kernel", "linear", rows=rows
                    )
                )
                if d.qkv_bias:
                    out.append(
                        Entry(f"{hf}{names.qkv}.bias", f"{ours}attn/{name}/bias", "bias", rows=rows)
                    )
                continue
            key = getattr(names, name)
            out.append(Entry(f"{hf}{key}.weight", f"{ours}attn/{name}/kernel", "linear"))
            if d.qkv_bias:
                out.append(Entry(f"{hf}{key}.bias", f"{ours}attn/{name}/bias", "bias"))
        out.append(Entry(f"{hf}{names.o}.weight", f"{ours}attn/o/kernel", "linear", in_dims=2))
        if d.get("out_bias", False):
            out.append(Entry(f"{hf}{names.o}.bias", f"{ours}attn/o/bias"))
        if d.qk_norm:
            out += [
                Entry(f"{hf}self_attn.q_norm.weight", f"{ours}attn/q_norm/scale"),
                Entry(f"{hf}self_attn.k_norm.weight", f"{ours}attn/k_norm/scale"),
            ]
        with_bias = d.get("ffn", "swiglu") == "mlp"
        if i in moe_at and moe_style == "deepspeed":
            block = f"{hf}{names.mlp}.deepspeed_moe."
            out.append(Entry(f"{block}gate.wg.weight", f"{ours}moe/router", "linear"))
            for e in range(num_experts):
                for name, hf_name in names.ffn:
                    key = f"{block}experts.deepspeed_experts.{e}.{hf_name}"
                    ours_e = f"{ours}moe/experts/{name}"
                    out.append(Entry(f"{key}.weight", ours_e, "expert", expert=e))
                    if with_bias:
                        out.append(Entry(f"{key}.bias", f"{ours_e}_bias", "expert", expert=e))
        elif i in moe_at:
            block = f"{hf}{MOE_BLOCK[moe_style]}."
            out.append(Entry(f"{block}gate.weight", f"{ours}moe/router", "linear"))
            for e in range(num_experts):
                for name, hf_name in zip(
                    ("gate", "up", "down"), EXPERT_NAMES[moe_style], strict=True
                ):
                    key = f"{block}experts.{e}.{hf_name}.weight"
                    out.append(Entry(key, f"{ours}moe/experts/{name}", "expert", expert=e))
        else:
            for name, hf_name in names.ffn:
                key = f"{hf}{names.mlp}.{hf_name}"
                out.append(Entry(f"{key}.weight", f"{ours}mlp/{name}/kernel", "linear"))
                if with_bias:
                    out.append(Entry(f"{key}.bias", f"{ours}mlp/{name}/bias"))
    out += _norm_entries(f"{p}{names.final_norm}", "decoder/final_norm", layer_norm)
    if not d.tie_embeddings:
        out.append(Entry(head_key, "decoder/lm_head", "linear"))
    if d.get("head_bias", False):
        out.append(Entry(head_key.replace(".weight", ".bias"), "decoder/lm_head_bias"))
    return out


def projector_entries(kind: str, prefix: str) -> list[Entry]:
    """LLaVA's multi_modal_projector: linear_1 (and linear_2 for mlp2x_gelu)."""
    if kind == "linear":
        return [
            Entry(f"{prefix}linear_1.weight", "projector/fc/kernel", "linear"),
            Entry(f"{prefix}linear_1.bias", "projector/fc/bias"),
        ]
    return [
        Entry(f"{prefix}linear_{i}.weight", f"projector/mlp/fc{i}/kernel", "linear") for i in (1, 2)
    ] + [Entry(f"{prefix}linear_{i}.bias", f"projector/mlp/fc{i}/bias") for i in (1, 2)]


def ours_paths(entries: Iterable[Entry]) -> set[str]:
    return {e.ours for e in entries}
