"""Vision-to-language projector: `mlp2x_gelu` (Linear-GELU-Linear, LLaVA-1.5) or `linear`.

With `projector.moe` the mlp2x_gelu projector is an MoE of such MLPs (CuMo's co-upcycling).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_lvlm.models.layers import DenseFeedForward, Projection
from moe_lvlm.models.moe import MoeFeedForward

Array = jax.Array


class Projector(nn.Module):
    """[batch, tokens, vision_width] -> ([batch, tokens, embed], MoE metrics).

    `valid` [batch, tokens] marks the tokens of real images for the MoE's losses and metrics.
    """

    config: Any  # model config
    train: bool = False
    mesh: Any = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, valid: Array | None = None) -> tuple[Array, dict[str, dict]]:
        p, d = self.config.projector, self.config.decoder.embed_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if p.kind == "linear":
            return Projection((d,), ("mlp", "embed"), use_bias=True, name="fc", **kw)(x), {}
        if p.moe:
            y, m = MoeFeedForward(
                self.config.moe,
                d,
                out_dim=d,
                activation="gelu",
                gated=False,
                mesh=self.mesh,
                name="moe",
                **kw,
            )(x, valid, train=self.train)
            return y, {"projector": m}
        return DenseFeedForward(
            d, out_dim=d, activation="gelu", gated=False, use_bias=True, name="mlp", **kw
        )(x), {}
