"""CuMo (arXiv 2405.05949) co-upcycling on the CPU demo: stage III upcycles the decoder FFNs, the
ViT MLPs and the projector into MoE layers and trains them all.

    python -m moe_lvlm.train --config=configs/cumo.py --workdir=runs/cumo

Stages I and II are the demo's (configs/demo.py, same arguments: `configs/cumo.py:steps=0.5`).
Stage III routes with dropless dispatch, Switch-style top-k balance counts, load-balancing
coefficient 0.1 and router z-loss coefficient 0.01, and trains the projector, every decoder FFN
and every ViT MLP (experts and routers).
"""

from configs import demo, stages


def get_config(arg: str | None = None):
    cfg = demo.get_config(arg)
    cfg.model.vision.moe_layers = "all"
    cfg.model.projector.moe = True
    cfg.model.moe.update(dispatch="dropless", balance_counts="topk", balance_loss_coef=0.1,
                         z_loss_coef=0.01)
    cfg.stage3.trainable = stages.cumo()["stage3"].trainable
    return cfg
