"""MoE-tuning stage presets (MoE-LLaVA, arXiv 2401.15947, and CuMo's co-upcycling).

Each stage section says what trains (regexes over parameter paths, matched from the start),
where the stage starts (`init_from`), whether the dense FFNs are upcycled into experts when it
starts, optimizer and schedule, batch, length, and the data mixture. Stages run in the order of
`config.stages`.
"""

import ml_collections

PROJECTOR = r"projector/"
DECODER = r"decoder/"
DECODER_FFNS = r"decoder/layers_\d+/(mlp|moe)/"
VISION_FFNS = r"vision/layers_\d+/(mlp|moe)/"


def stage(
    trainable, lr, batch_size, num_steps, mixture, upcycle=False, init_from=""
) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            # Regexes over '/'-joined parameter paths; the rest is frozen (no optimizer state).
            trainable=tuple(trainable),
            # Where the parameters come from: '' = the stage before this one in config.stages
            # (fresh for the first), a stage name = that stage's final checkpoint in the workdir,
            # 'none' = fresh initialisation.
            init_from=init_from,
            # Turn the dense FFNs into experts (copies) plus fresh routers when the stage starts.
            upcycle=upcycle,
            lr=lr,
            # Linear warmup from 0 over this fraction of the steps, then cosine decay to
            # lr * final_lr_fraction.
            warmup_fraction=0.03,
            final_lr_fraction=0.0,
            weight_decay=0.0,
            # Global-norm gradient clipping threshold.
            clip_norm=1.0,
            # Global batch (rows per optimizer step), split into grad_accum micro-batches.
            batch_size=batch_size,
            grad_accum=1,
            # Length: num_steps, or with num_epochs > 0, ceil(num_epochs * records / batch_size)
            # over the records of the mixture's sources (rows, not packed samples).
            num_steps=num_steps,
            num_epochs=0.0,
            # Row length in tokens; 0 = config.data.seq_len. Short-answer stages can use shorter
            # rows (a sample that does not fit is skipped as too_long, or cut with data.truncate).
            seq_len=0,
            # Data mixture spec (see config.data.mixture); '' = config.data.mixture.
            mixture=mixture,
        )
    )


def moe_llava(steps=(2180, 7530, 5200), batches=(256, 128, 128), mixtures=None) -> dict:
    """I: projector only (lr 1e-3); II: projector + LLM (2e-5); III: upcycle, then every FFN
    (experts, routers, remaining dense FFNs) + projector (2e-5). The vision tower stays frozen.
    Each stage starts from the final checkpoint of the one before.

    Default step counts are one epoch of LLaVA-PT 558k / 964k instructions / mix665k.
    """
    mixtures = mixtures or ("", "", "")
    return {
        "stage1": stage([PROJECTOR], 1e-3, batches[0], steps[0], mixtures[0]),
        "stage2": stage([PROJECTOR, DECODER], 2e-5, batches[1], steps[1], mixtures[1],
                        init_from="stage1"),
        "stage3": stage([PROJECTOR, DECODER_FFNS], 2e-5, batches[2], steps[2], mixtures[2],
                        upcycle=True, init_from="stage2"),
    }


def cumo(steps=(2180, 7530, 5200), batches=(256, 128, 128), mixtures=None) -> dict:
    """CuMo: as MoE-LLaVA, but stage III also trains the ViT MLPs. Upcycling the ViT MLPs and the
    projector (co-upcycling) is a model choice: `model.vision.moe_layers`, `model.projector.moe`
    (configs/cumo.py sets both)."""
    stages = moe_llava(steps, batches, mixtures)
    stages["stage3"].trainable = (PROJECTOR, DECODER_FFNS, VISION_FFNS)
    return stages
