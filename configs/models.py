"""Model presets: each returns the `config.model` section of a full config.

`get(name)` looks a preset up by name; `configs/base.py` documents every field.
"""

import ml_collections

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def moe_defaults() -> ml_collections.ConfigDict:
    """Routing hyper-parameters shared by every MoE layer (decoder, and with CuMo ViT/projector)."""
    return ml_collections.ConfigDict(
        dict(
            num_experts=4,
            top_k=2,
            # 'dropless' (sort + jax.lax.ragged_dot) or 'capacity' (GShard slots, gather dispatch).
            dispatch="dropless",
            # Dropless grouped matmul: 'auto' ('tiled' on CPU, else 'xla'), 'xla'
            # (jax.lax.ragged_dot, every platform), 'tiled' (batched matmuls over row tiles) or
            # 'mosaic' (Pallas Mosaic GPU kernels, Hopper only; moe_lvlm/models/grouped_matmul.py).
            grouped_matmul="auto",
            # Capacity per routing group (one sequence) = ceil(top_k * tokens / E * factor).
            capacity_factor_train=1.5,
            capacity_factor_eval=2.0,
            # Load-balancing loss E * sum_e f_e * P_e; f_e counts the 'top1' choice (MoE-LLaVA /
            # DeepSpeed) or all 'topk' choices (Switch-style top-k, CuMo).
            balance_loss_coef=0.01,
            balance_counts="top1",
            z_loss_coef=0.0,
            # Gumbel noise on the second choice's logits during training (DeepSpeed top2gating).
            second_choice_noise=False,
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
            ),
            moe=moe_defaults(),
            # Id of the <image> placeholder token; set from the tokenizer at start-up.
            image_token_id=-1,
            dtype="float32",
            param_dtype="float32",
            remat="none",
            # 'auto': blockwise on CPU, cuDNN on GPU (16-bit); moe_lvlm/models/attention.py.
            attention="auto",
        )
    )


def moe_llava_1p6bx4() -> ml_collections.ConfigDict:
    """MoE-LLaVA-1.6Bx4-Top2-like: CLIP ViT-L/14-336 (layer -2, no CLS), d=2048 24-layer decoder."""
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
    cfg.dtype = "bfloat16"
    cfg.remat = "full"
    return cfg


PRESETS = {"tiny": tiny, "moe_llava_1p6bx4": moe_llava_1p6bx4}


def get(name: str) -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
