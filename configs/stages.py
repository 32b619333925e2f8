"""MoE-tuning stage presets (MoE-LLaVA, arXiv 2401.15947, and CuMo's co-upcycling).

Each stage section: what trains (regexes over parameter paths, matched from the start), whether
the dense FFNs are upcycled into experts when the stage starts, optimizer and schedule, batch,
length, and the data mixture. Stages run in the order of `config.stages`; each starts from the
previous stage's final parameters.
"""

import ml_collections

PROJECTOR = r"projector/"
DECODER = r"decoder/"
DECODER_FFNS = r"decoder/layers_\d+/(mlp|moe)/"
VISION_FFNS = r"vision/layers_\d+/(mlp|moe)/"


def stage(trainable, lr, batch_size, num_steps, mixture, upcycle=False) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            trainable=list(trainable),
            upcycle=upcycle,
            lr=lr,
            warmup_fraction=0.03,
            final_lr_fraction=0.0,
            weight_decay=0.0,
            clip_norm=1.0,
            batch_size=batch_size,
            grad_accum=1,
            num_steps=num_steps,
            mixture=mixture,
        )
    )


def moe_llava(steps=(2180, 7530, 5200), batches=(256, 128, 128), mixtures=None) -> dict:
    """I: projector only (lr 1e-3); II: projector + LLM (2e-5); III: upcycle, then every FFN
    (experts, routers, remaining dense FFNs) + projector (2e-5). The vision tower stays frozen.

    Default step counts are one epoch of LLaVA-PT 558k / 964k instructions / mix665k.
    """
    mixtures = mixtures or ("", "", "")
    return {
        "stage1": stage([PROJECTOR], 1e-3, batches[0], steps[0], mixtures[0]),
        "stage2": stage([PROJECTOR, DECODER], 2e-5, batches[1], steps[1], mixtures[1]),
        "stage3": stage([PROJECTOR, DECODER_FFNS], 2e-5, batches[2], steps[2], mixtures[2],
                        upcycle=True),
    }


def cumo(steps=(2180, 7530, 5200), batches=(256, 128, 128), mixtures=None) -> dict:
    """CuMo: as MoE-LLaVA, but stage III also upcycles the ViT MLPs and the projector
    (co-upcycling) and trains them with the decoder FFNs."""
    stages = moe_llava(steps, batches, mixtures)
    stages["stage3"].trainable = [PROJECTOR, DECODER_FFNS, VISION_FFNS]
    return stages
