"""Tiny random MoE-LLaVA checkpoints in the released layout, built in PyTorch.

The model is what MoE-LLaVA builds: a transformers decoder whose MoE layers' `mlp` is DeepSpeed's
`MoE` (here `DeepSpeedMoE`, a transcription of deepspeed.moe's MOELayer + TopKGate.top2gating in
eval mode), with `image_tower.image_tower` (CLIPVisionModel) and `mm_projector.image_spatial_proj`
(Linear-GELU-Linear) on the inner model. Its `state_dict()` therefore has MoE-LLaVA's key names;
Qwen-1 (no transformers class) is a Qwen2 model with its keys rewritten to Qwen-1's.
"""

import copy
import json
import math
import re

import numpy as np
import transformers
from safetensors.torch import save_file

from tests.interop.hf_helpers import randomize_torch, torch

nn = torch.nn
SIZES = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=16,
    patch_size=8,
)
IMAGE_TOKEN_ID = 7
NUM_EXPERTS = 4


class TopKGate(nn.Module):
    def __init__(self, d: int, num_experts: int):
        super().__init__()
        self.wg = nn.Linear(d, num_experts, bias=False)


class Experts(nn.Module):
    def __init__(self, expert: nn.Module, num_experts: int):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_experts))


class MOELayer(nn.Module):
    """DeepSpeed's MOELayer with top-2 gating, eval mode: every token of the batch in one group,
    capacity = max(ceil(S / E * eval_capacity_factor * 2), min_capacity), first choices fill the
    buffers before second choices, the two kept gates renormalised, einsum dispatch/combine. The
    Gumbel noise DeepSpeed <= 0.9 adds to the second choice's logits (even in eval) is `noise`."""

    def __init__(self, d, expert, num_experts, capacity_factor, min_capacity):
        super().__init__()
        self.gate = TopKGate(d, num_experts)
        self.experts = Experts(expert, num_experts)
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.noise = None

    def forward(self, x):
        d = x.shape[-1]
        tokens = x.reshape(-1, d)
        logits = self.gate.wg(tokens.float())
        gates = torch.softmax(logits, dim=1)
        s, e = gates.shape
        capacity = max(math.ceil(s / e * self.capacity_factor * 2), self.min_capacity)
        mask1 = nn.functional.one_hot(torch.argmax(gates, dim=1), e)
        noisy = logits if self.noise is None else logits + self.noise
        except1 = noisy.masked_fill(mask1.bool(), torch.finfo(logits.dtype).min)
        mask2 = nn.functional.one_hot(torch.argmax(except1, dim=1), e)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        loc2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
        mask1 = mask1 * torch.lt(loc1, capacity)
        mask2 = mask2 * torch.lt(loc2, capacity)
        loc1_s, loc2_s = torch.sum(loc1 * mask1, dim=1), torch.sum(loc2 * mask2, dim=1)
        g1, g2 = (gates * mask1).sum(dim=1), (gates * mask2).sum(dim=1)
        denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
        g1, g2 = g1 / denom, g2 / denom
        combine = torch.einsum(
            "se,sc->sec", g1[:, None] * mask1, nn.functional.one_hot(loc1_s, capacity).float()
        ) + torch.einsum(
            "se,sc->sec", g2[:, None] * mask2, nn.functional.one_hot(loc2_s, capacity).float()
        )
        dispatched = torch.einsum("sec,sm->ecm", combine.bool().type_as(x), tokens)
        out = torch.stack(
            [ex(dispatched[i]) for i, ex in enumerate(self.experts.deepspeed_experts)]
        )
        return torch.einsum("sec,ecm->sm", combine.type_as(x), out).reshape(x.shape)


class DeepSpeedMoE(nn.Module):
    """deepspeed.moe.layer.MoE: holds `deepspeed_moe` (the key prefix of released checkpoints)."""

    def __init__(self, d, expert, num_experts, capacity_factor=2.0, min_capacity=0):
        super().__init__()
        self.deepspeed_moe = MOELayer(d, expert, num_experts, capacity_factor, min_capacity)

    def forward(self, x):
        return self.deepspeed_moe(x)


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP))


class Projector(nn.Module):
    def __init__(self, d_in, d):
        super().__init__()
        self.image_spatial_proj = nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d))


def _text_model(backbone: str):
    if backbone == "stablelm":
        cfg = transformers.StableLmConfig(**SIZES, use_qkv_bias=True, partial_rotary_factor=0.25)
        return transformers.StableLmForCausalLM(cfg)
    if backbone == "phi":
        sizes = dict(SIZES, hidden_size=40)  # head_dim 10: 40% = 4 rotary features
        cfg = transformers.PhiConfig(**sizes, partial_rotary_factor=0.4, hidden_act="gelu_new")
        return transformers.PhiForCausalLM(cfg)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES))


def build(backbone: str, moe_layers=(0,), seed: int = 0):
    """The PyTorch MoE-LLaVA model (eval mode) of `backbone` ('stablelm', 'phi', 'qwen')."""
    torch.manual_seed(seed)
    text = _text_model(backbone)
    randomize_torch(text, seed)
    inner = text.model
    for i in moe_layers:
        dense = inner.layers[i].mlp
        moe = DeepSpeedMoE(text.config.hidden_size, dense, NUM_EXPERTS)
        for j, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            randomize_torch(expert, seed + 10 + j)  # the experts differ (as after stage III)
        randomize_torch(moe.deepspeed_moe.gate, seed + 20)
        inner.layers[i].mlp = moe
    inner.image_tower = Tower()
    randomize_torch(inner.image_tower, seed + 30)
    inner.mm_projector = Projector(CLIP["hidden_size"], text.config.hidden_size)
    randomize_torch(inner.mm_projector, seed + 40)
    return text.eval()


def forward(model, ids: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """MoE-LLaVA's forward: the projected patch features of CLIP's second-to-last layer replace
    the embeddings of the image tokens (in order), then the decoder. Logits [b, s, vocab]."""
    inner = model.model
    with torch.no_grad():
        hidden = inner.image_tower.image_tower(torch.tensor(pixels), output_hidden_states=True)
        feats = inner.mm_projector.image_spatial_proj(hidden.hidden_states[-2][:, 1:])
        ids_t = torch.tensor(ids)
        embeds = inner.embed_tokens(ids_t)
        for b in range(ids.shape[0]):
            embeds[b, ids_t[b] == IMAGE_TOKEN_ID] = feats[b]
        return model(inputs_embeds=embeds).logits.numpy()


QWEN1_RENAMES = [
    (r"^model\.layers\.(\d+)\.", r"transformer.h.\1."),
    (r"^model\.embed_tokens\.", "transformer.wte."),
    (r"^model\.norm\.", "transformer.ln_f."),
    (r"^model\.", "transformer."),
    (r"\.self_attn\.o_proj\.", ".attn.c_proj."),
    (r"\.input_layernorm\.", ".ln_1."),
    (r"\.post_attention_layernorm\.", ".ln_2."),
    (r"\.gate_proj\.", ".w2."),
    (r"\.up_proj\.", ".w1."),
    (r"\.down_proj\.", ".c_proj."),
]


def qwen1_state(state: dict) -> dict:
    """A Qwen2 (MHA) state dict in Qwen-1's key names, q/k/v fused into c_attn."""
    out = {}
    for key, value in state.items():
        if key.startswith(("model.image_tower", "model.mm_projector")):
            out["transformer." + key[len("model.") :]] = value
            continue
        if re.search(r"self_attn\.[kv]_proj", key):
            continue
        if re.search(r"self_attn\.q_proj", key):
            parts = [state[key.replace("q_proj", n)] for n in ("q_proj", "k_proj", "v_proj")]
            key, value = key.replace("self_attn.q_proj", "attn.c_attn"), torch.cat(parts)
        for pattern, repl in QWEN1_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def text_config(backbone: str, model) -> dict:
    """The text fields of MoE-LLaVA's config.json for `backbone` (its own config classes)."""
    c = model.config
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        tie_word_embeddings=False,
    )
    rope = c.rope_parameters
    if backbone == "stablelm":  # StableLMEpochConfig
        return dict(
            common,
            model_type="moe_llava_stablelm",
            intermediate_size=c.intermediate_size,
            num_key_value_heads=c.num_key_value_heads,
            hidden_act="silu",
            rope_pct=rope["partial_rotary_factor"],
            rope_theta=rope["rope_theta"],
            norm_eps=c.layer_norm_eps,
            use_qkv_bias=True,
        )
    if backbone == "phi":
        return dict(
            common,
            model_type="moe_llava_phi",
            intermediate_size=c.intermediate_size,
            num_key_value_heads=c.num_key_value_heads,
            hidden_act="gelu_new",
            partial_rotary_factor=rope["partial_rotary_factor"],
            rope_theta=rope["rope_theta"],
            layer_norm_eps=c.layer_norm_eps,
            qk_layernorm=False,
        )
    return dict(
        common,
        model_type="moe_llava_qwen",
        kv_channels=c.hidden_size // c.num_attention_heads,
        intermediate_size=2 * c.intermediate_size,
        layer_norm_epsilon=c.rms_norm_eps,
        rotary_pct=1.0,
        rotary_emb_base=rope["rope_theta"],
        no_bias=True,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        seq_length=8192,
    )


def save(model, backbone: str, directory, moe_layers=(0,)) -> None:
    """Writes config.json (MoE-LLaVA's fields) and model.safetensors in the released layout, and
    the tiny tower's CLIP config under directory/clip (MoE-LLaVA only names its tower)."""
    directory.mkdir(parents=True)
    # transformers 4.x's CLIPVisionModel (MoE-LLaVA's) held the tower under `vision_model.`.
    tower = "model.image_tower.image_tower."
    state = {
        k.replace(tower, tower + "vision_model."): v.contiguous()
        for k, v in model.state_dict().items()
    }
    if backbone == "qwen":
        state = qwen1_state(state)
    save_file(state, directory / "model.safetensors")
    cfg = dict(
        text_config(backbone, model),
        moe=dict(
            moe_enable=bool(moe_layers),
            moe_mode="sparse",
            moe_layers_idx=list(moe_layers),
            ep_size=1,
            top_k_experts=2,
            capacity_factor=1.5,
            eval_capacity_factor=2.0,
            min_capacity=0,
            use_residual=False,
            router_aux_loss_coef=0.01,
            num_experts=[NUM_EXPERTS] * len(moe_layers),
            train_modules=[],
        ),
        mm_image_tower="openai/clip-vit-large-patch14-336",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        image_projector_type="mlp2x_gelu",
        mm_hidden_size=CLIP["hidden_size"],
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
    )
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    model.model.image_tower.image_tower.config.save_pretrained(directory / "clip")
