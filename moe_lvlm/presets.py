"""Model presets: each returns the `config.model` section of a full config.

`get(name)` looks a preset up by name; `configs/base.py` documents the run fields and
moe_lvlm/models/decoder.py the decoder's block options. They live in the package (not in
configs/) because import and export build model configs from them.
"""

import ml_collections

from moe_lvlm.models.decoder import VARIANT_DEFAULTS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def moe_defaults() -> ml_collections.ConfigDict:
    """Routing hyper-parameters shared by every MoE layer (decoder, and with CuMo ViT/projector)."""
    return ml_collections.ConfigDict(
        dict(
            num_experts=4,
            top_k=2,
            # 'dropless' (sort + jax.lax.ragged_dot) or 'capacity' (GShard einsum dispatch).
            dispatch="dropless",
            # Dropless grouped matmul: 'xla' (jax.lax.ragged_dot, every platform), 'mosaic'
            # (Pallas Mosaic GPU kernels, Hopper only), 'megablox' (Pallas TPU; interpret mode
            # elsewhere), 'auto' (megablox on TPU, else xla); moe_lvlm/models/grouped_matmul.py.
            grouped_matmul="auto",
            # Dropless tokens to the experts' devices when mesh.expert > 1: 'ragged_a2a'
            # (jax.lax.ragged_all_to_all, GPU/TPU), 'a2a_buffer' (fixed-size all_to_all, any
            # platform), 'all_gather' (tokens stay; every expert's weights gathered), 'auto'
            # (ragged_a2a on GPU/TPU, a2a_buffer on CPU). moe_lvlm/models/dropless_ep.py.
            ep_dispatch="auto",
            # How the experts run: 'routed' (each token through its chosen experts, by the
            # dispatch above), 'dense' (every expert on every token, weighted by the combine
            # weights, zero for pairs not chosen or dropped: the same result at E / k times the
            # expert FLOPs, no gathers; slower on the CPU box at E=4, k=2), 'native' (CPU: the
            # kept pairs of either dispatch through a fused C++ SwiGLU kernel,
            # moe_lvlm/kernels/native_moe.py) or 'auto' ('native' on CPU for the SwiGLU
            # experts without expert parallelism, else 'routed'); moe_lvlm/models/moe.py.
            expert_compute="auto",
            # Capacity per expert and routing group = max(min_capacity, ceil(tokens / E * top_k *
            # factor)) (DeepSpeed's formula); the group is each 'sequence' or all tokens of a
            # 'batch_shard' (the rows on one device, flattened: DeepSpeed's per-device gating).
            capacity_factor_train=1.5,
            capacity_factor_eval=2.0,
            min_capacity=0,
            capacity_group="sequence",
            # Which pairs keep an over-full expert's slots, within each choice round: 'position'
            # (the earliest tokens: GShard, DeepSpeed top2gating) or 'random' (uniform priorities
            # drawn on every call: DeepSpeed top1gating's random token selection, use_rts).
            drop_policy="position",
            # Weights of the chosen experts' outputs: 'softmax' (raw probabilities: Switch,
            # DeepSpeed top1gating), 'renorm_chosen' (renormalised over the k chosen: GShard),
            # 'renorm_kept' (over the choices kept after the capacity drop: DeepSpeed
            # top2gating), 'auto' (softmax for top-1, renorm_chosen for top-k >= 2).
            combine_weights="auto",
            # Load-balancing loss E * sum_e f_e * P_e; f_e counts the 'top1' choice (MoE-LLaVA /
            # DeepSpeed) or all 'topk' choices (Switch-style top-k, CuMo).
            balance_loss_coef=0.01,
            balance_counts="top1",
            z_loss_coef=0.0,
            # Gumbel noise on the logits of the choices after the first (DeepSpeed top2gating's
            # second-expert sampling): 'none', 'train' (training steps only) or 'always'
            # (evaluation too, as DeepSpeed 0.9.5 draws it on every forward).
            second_choice_noise="none",
            # Std of the noise added to each expert copy at upcycling (0 = exact copies).
            upcycle_noise_std=0.0,
        )
    )


def tiny() -> ml_collections.ConfigDict:
    """A model small enough for tests and the CPU demo (~2M parameters)."""
    return ml_collections.ConfigDict(
        dict(
            vision=dict(
                image_size=32,
                patch_size=8,
                width=64,
                depth=3,
                num_heads=4,
                mlp_dim=128,
                activation="quick_gelu",
                class_token=True,
                pre_norm=True,
                patch_bias=False,
                select_layer=-2,
                keep_class_token=False,
                layer_norm_eps=1e-5,
                moe_layers="none",
                mean=CLIP_MEAN,
                std=CLIP_STD,
            ),
            projector=dict(kind="mlp2x_gelu", moe=False),
            decoder=dict(
                vocab_size=1024,
                embed_dim=128,
                num_layers=4,
                num_heads=4,
                num_kv_heads=2,
                head_dim=32,
                mlp_dim=256,
                rope_theta=10000.0,
                norm_eps=1e-6,
                qkv_bias=False,
                qk_norm=False,
                tie_embeddings=False,
                moe_layers="every_other",
                **VARIANT_DEFAULTS,
            ),
            moe=moe_defaults(),
            # Id of the <image> placeholder token; set from the tokenizer at start-up.
            image_token_id=-1,
            dtype="float32",
            param_dtype="float32",
            remat="none",
            attention="auto",
            # The decoder's dense SwiGLU FFN: 'xla' (three dots), 'native' (CPU: the fused C++
            # expert kernel as one expert, moe_lvlm/kernels/native_moe.py; same parameters) or
            # 'auto' ('native' on CPU for a SwiGLU without biases, widths multiples of 16 and
            # mesh.tensor 1, else 'xla').
            dense_ffn="auto",
            # The training loss's LM head + cross-entropy: 'xla' (logits, then the loss),
            # 'native' (CPU: one fused C++ kernel that never materialises the logits,
            # moe_lvlm/kernels/native_lm_loss.py) or 'auto' ('native' on one CPU device for
            # embed_dim a multiple of 16, else 'xla'). Evaluation and generation use the logits.
            lm_head_loss="auto",
            # The decoder's RMSNorms: 'xla', 'native' (CPU: the C++ kernel of
            # moe_lvlm/kernels/native_norm.py; same parameter) or 'auto' ('native' on CPU where
            # it builds, else 'xla').
            rms_norm="auto",
        )
    )


def moe_llava_1p6bx4() -> ml_collections.ConfigDict:
    """MoE-LLaVA-1.6Bx4-Top2-like: CLIP ViT-L/14-336 (layer -2, no CLS), d=2048 24-layer decoder.

    LLaMA-shaped (RMSNorm, full RoPE): the benchmarks' reference shape. The released weights fit
    `moe_llava_stablelm_1p6bx4` instead."""
    cfg = tiny()
    cfg.vision.update(
        image_size=336,
        patch_size=14,
        width=1024,
        depth=24,
        num_heads=16,
        mlp_dim=4096,
    )
    cfg.decoder.update(
        vocab_size=100352,
        embed_dim=2048,
        num_layers=24,
        num_heads=32,
        num_kv_heads=32,
        head_dim=64,
        mlp_dim=5632,
        rope_theta=10000.0,
        norm_eps=1e-6,
    )
    # DeepSpeed 0.9.5 MoE as MoE-LLaVA builds it (top2gating, min_capacity=0, one routing group
    # per device's micro-batch, second choice by Gumbel sampling on every forward).
    cfg.moe.update(dispatch="capacity", combine_weights="renorm_kept", second_choice_noise="always",
                   capacity_group="batch_shard", min_capacity=0)
    cfg.dtype = "bfloat16"
    cfg.remat = "full"
    return cfg


def _moe_llava(decoder: dict) -> ml_collections.ConfigDict:
    """MoE-LLaVA's released models: CLIP ViT-L/14-336 features of layer -2 without CLS, an
    mlp2x_gelu projector, 4 experts top-2 in every other decoder layer from 0 (moe_mode 'sparse'),
    DeepSpeed top2gating (renormalised weights, capacity 1.5 train / 2.0 eval here, aux loss 0.01).
    Chat template: 'vicuna_v1' (MoE-LLaVA's conv_stablelm/phi/qwen: USER/ASSISTANT, the
    tokenizer's <|endoftext|> closing each answer)."""
    cfg = moe_llava_1p6bx4()
    cfg.decoder = ml_collections.ConfigDict({**cfg.decoder.to_dict(), **decoder})
    # DeepSpeed drops tokens over capacity while training (k * 1.5 < E) and none at eval.
    cfg.moe.dispatch = "capacity"
    return cfg


def moe_llava_stablelm_1p6bx4() -> ml_collections.ConfigDict:
    """MoE-LLaVA-StableLM-1.6B-4e: stabilityai/stablelm-2-1_6b (LayerNorm, 25% RoPE, qkv bias)."""
    return _moe_llava(
        dict(
            vocab_size=100352,
            embed_dim=2048,
            num_layers=24,
            num_heads=32,
            num_kv_heads=32,
            head_dim=64,
            mlp_dim=5632,
            rope_theta=10000.0,
            norm_eps=1e-5,
            qkv_bias=True,
            norm="layer",
            rotary_fraction=0.25,
        )
    )


def moe_llava_qwen_1p8bx4() -> ml_collections.ConfigDict:
    """MoE-LLaVA-Qwen-1.8B-4e: Qwen/Qwen-1_8B (RMSNorm, qkv bias, SwiGLU of width 11008 / 2)."""
    return _moe_llava(
        dict(
            vocab_size=151936,
            embed_dim=2048,
            num_layers=24,
            num_heads=16,
            num_kv_heads=16,
            head_dim=128,
            mlp_dim=5504,
            rope_theta=10000.0,
            norm_eps=1e-6,
            qkv_bias=True,
        )
    )


def moe_llava_phi2_2p7bx4() -> ml_collections.ConfigDict:
    """MoE-LLaVA-Phi2-2.7B-4e: microsoft/phi-2 (LayerNorm, 40% RoPE, parallel attention + GELU
    MLP with biases, attention output and LM head biases)."""
    return _moe_llava(
        dict(
            vocab_size=51200,
            embed_dim=2560,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            head_dim=80,
            mlp_dim=10240,
            rope_theta=10000.0,
            norm_eps=1e-5,
            qkv_bias=True,
            norm="layer",
            rotary_fraction=0.4,
            parallel_block=True,
            ffn="mlp",
            activation="gelu_tanh",
            out_bias=True,
            head_bias=True,
        )
    )


PRESETS = {
    "tiny": tiny,
    "moe_llava_1p6bx4": moe_llava_1p6bx4,
    "moe_llava_stablelm_1p6bx4": moe_llava_stablelm_1p6bx4,
    "moe_llava_qwen_1p8bx4": moe_llava_qwen_1p8bx4,
    "moe_llava_phi2_2p7bx4": moe_llava_phi2_2p7bx4,
}


def get(name: str) -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
