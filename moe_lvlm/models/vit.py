"""Vision encoder compatible with CLIP (pre-LN, class token, quick-GELU) and SigLIP (no class token,
GELU-tanh). Returns the hidden states of the selected layer, as LLaVA takes them.

`select_layer` indexes HF-style hidden states: 0 is the embedding output (after CLIP's pre-norm),
i the output of block i-1, -1 the last block, -2 the one before (MoE-LLaVA). Blocks after the
selected one are neither built nor run.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_lvlm.config import moe_layer_indices
from moe_lvlm.models.layers import (
    BATCH_LENGTH_EMBED,
    Attention,
    DenseFeedForward,
    LayerNorm,
    Projection,
    param_with_axes,
)
from moe_lvlm.models.moe import MoeFeedForward

Array = jax.Array


def num_layers_run(depth: int, select_layer: int) -> int:
    """How many blocks run to produce hidden state `select_layer` (HF hidden_states indexing)."""
    return select_layer % (depth + 1)


def patchify(images: Array, patch: int) -> Array:
    """[batch, H, W, C] -> [batch, (H/p)*(W/p), p, p, C], patches in row-major order."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch, patch, c)


class VisionBlock(nn.Module):
    config: Any  # model config
    use_moe: bool
    train: bool = False
    mesh: Any = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, valid: Array | None = None) -> tuple[Array, dict | None]:
        v = self.config.vision
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(v.layer_norm_eps, name="norm1", **kw)(x)
        h = Attention(
            v.num_heads,
            v.num_heads,
            v.width // v.num_heads,
            causal=False,
            qkv_bias=True,
            out_bias=True,
            implementation=self.config.attention,
            mesh=self.mesh,
            name="attn",
            **kw,
        )(h)
        x = x + h
        h = LayerNorm(v.layer_norm_eps, name="norm2", **kw)(x)
        metrics = None
        if self.use_moe:
            h, metrics = MoeFeedForward(
                self.config.moe,
                v.mlp_dim,
                activation=v.activation,
                gated=False,
                mesh=self.mesh,
                name="moe",
                **kw,
            )(h, valid, train=self.train)
        else:
            h = DenseFeedForward(
                v.mlp_dim, activation=v.activation, gated=False, use_bias=True, name="mlp", **kw
            )(h)
        x = nn.with_logical_constraint(x + h, BATCH_LENGTH_EMBED)
        return x, metrics


class VisionEncoder(nn.Module):
    """images [batch, H, W, 3] (normalised) -> features [batch, tokens, width], MoE metrics.

    `image_valid` [batch] marks real images; the others (fillers for rows without an image) take
    no part in the MoE blocks' routing losses and metrics.
    """

    config: Any  # model config
    train: bool = False
    mesh: Any = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, images: Array, image_valid: Array | None = None
    ) -> tuple[Array, dict[str, dict]]:
        v = self.config.vision
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        patches = patchify(images.astype(self.dtype), v.patch_size)
        x = Projection(
            (v.width,),
            (None, None, None, "embed"),
            in_dims=3,
            use_bias=v.patch_bias,
            name="patch_embed",
            **kw,
        )(patches)
        if v.class_token:
            cls = param_with_axes(
                self, "cls", nn.initializers.normal(0.02), (v.width,), ("embed",), self.param_dtype
            )
            x = jnp.concatenate(
                [jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, v.width)), x], 1
            )
        pos = param_with_axes(
            self,
            "pos_embed",
            nn.initializers.normal(0.02),
            x.shape[1:],
            (None, "embed"),
            self.param_dtype,
        )
        x = x + pos.astype(x.dtype)
        if v.pre_norm:
            x = LayerNorm(v.layer_norm_eps, name="pre_norm", **kw)(x)
        moe_at = set(moe_layer_indices(v.moe_layers, v.depth))
        valid = None if image_valid is None else jnp.broadcast_to(image_valid[:, None], x.shape[:2])
        metrics = {}
        for i in range(num_layers_run(v.depth, v.select_layer)):
            x, m = VisionBlock(
                self.config, i in moe_at, self.train, self.mesh, name=f"layers_{i}", **kw
            )(x, valid)
            if m is not None:
                metrics[f"vision/layers_{i}"] = m
        if v.class_token and not v.keep_class_token:
            x = x[:, 1:]
        return x, metrics
