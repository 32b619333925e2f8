"""The decoder: one block with the options real backbones need; each block's FFN is dense or MoE
(`decoder.moe_layers`).

LLaMA/Mistral/Qwen1-3: RMSNorm, RoPE, SwiGLU, grouped-query attention, qkv bias (Qwen1/2), qk-norm
(Qwen3), tied embeddings. StableLM-2: LayerNorm with bias, RoPE over 25% of each head, qkv bias.
Phi-2: LayerNorm, RoPE over 40%, parallel attention + MLP from one norm, a GELU MLP with biases
(fc1/fc2, also what its experts upcycle), attention output bias and an LM head bias.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_lvlm.config import moe_layer_indices
from moe_lvlm.models import matmul
from moe_lvlm.models.layers import (
    BATCH_LENGTH_EMBED,
    Attention,
    DenseFeedForward,
    LayerNorm,
    RMSNorm,
    param_with_axes,
)
from moe_lvlm.models.moe import MoeFeedForward

Array = jax.Array

# The block options and their LLaMA values (configs written before they existed lack them).
VARIANT_DEFAULTS = dict(
    norm="rms",  # 'rms' (RMSNorm) or 'layer' (LayerNorm with bias)
    rotary_fraction=1.0,  # share of each head's features that RoPE rotates
    parallel_block=False,  # x + attn(norm(x)) + ffn(norm(x)) with one norm (Phi-2)
    ffn="swiglu",  # 'swiglu' (gate/up/down, no bias) or 'mlp' (fc1/fc2 with bias)
    activation="silu",  # the FFN activation (layers.activation_fn)
    out_bias=False,  # attention output projection bias
    head_bias=False,  # LM head bias
)


def variant(d: Any, key: str) -> Any:
    """A block option of decoder config `d`, with its default when the config predates it."""
    return d.get(key, VARIANT_DEFAULTS[key])


def _norm(config: Any, name: str, kw: dict, mesh: Any) -> nn.Module:
    d = config.decoder
    if variant(d, "norm") == "layer":
        return LayerNorm(d.norm_eps, name=name, **kw)
    return RMSNorm(d.norm_eps, name=name, implementation=config.get("rms_norm", "auto"),
                   mesh=mesh, **kw)


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderBlock(nn.Module):
    config: Any  # model config
    use_moe: bool
    train: bool = False
    decode: bool = False
    max_len: int = 0
    packed: bool = False
    mesh: Any = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array) -> tuple[Array, dict | None]:
        d = self.config.decoder
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        valid = segment_ids > 0
        h = _norm(self.config, "attn_norm", kw, self.mesh)(x)
        attn = Attention(
            d.num_heads,
            d.num_kv_heads,
            d.head_dim,
            causal=True,
            qkv_bias=d.qkv_bias,
            out_bias=variant(d, "out_bias"),
            qk_norm=d.qk_norm,
            norm_eps=d.norm_eps,
            rope_theta=d.rope_theta,
            rotary_fraction=variant(d, "rotary_fraction"),
            implementation=self.config.attention,
            mesh=self.mesh,
            name="attn",
            **kw,
        )(
            h,
            positions,
            segment_ids=segment_ids if self.packed and not self.decode else None,
            decode=self.decode,
            max_len=self.max_len,
            kv_valid=valid,
        )
        if not variant(d, "parallel_block"):
            x = x + attn
            h = _norm(self.config, "ffn_norm", kw, self.mesh)(x)
        gated = variant(d, "ffn") == "swiglu"
        act = variant(d, "activation")
        metrics = None
        if self.use_moe:
            h, metrics = MoeFeedForward(
                self.config.moe,
                d.mlp_dim,
                activation=act,
                gated=gated,
                mesh=self.mesh,
                name="moe",
                **kw,
            )(h, valid, train=self.train)
        else:
            h = DenseFeedForward(
                d.mlp_dim, activation=act, gated=gated, use_bias=not gated,
                implementation=self.config.get("dense_ffn", "auto"), mesh=self.mesh, name="mlp",
                **kw,
            )(h)
        if variant(d, "parallel_block"):
            h = h + attn
        x = nn.with_logical_constraint(x + h, BATCH_LENGTH_EMBED)
        return x, metrics


def splice_image_features(embeds: Array, ids: Array, features: Array, image_token_id: int) -> Array:
    """Puts image features where `ids == image_token_id`: the j-th placeholder of row b takes
    features[b, j]. embeds: [batch, seq, d]; features: [batch, n, d]."""
    is_image = ids == image_token_id
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features.astype(embeds.dtype), index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, embeds)


class Decoder(nn.Module):
    """Token ids [batch, seq] -> logits [batch, seq, vocab] (float32), MoE metrics.

    `image_features` [batch, n, embed], when given, replace the embeddings of the image
    placeholder tokens in order. With `return_hidden` the final-normed hidden states
    [batch, seq, embed] come out instead of the logits (the training loss applies the head itself,
    `head_weights`; moe_lvlm/train/step.py).
    """

    config: Any  # model config
    train: bool = False
    decode: bool = False
    max_len: int = 0
    packed: bool = False
    mesh: Any = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    return_hidden: bool = False

    @nn.compact
    def __call__(
        self, ids: Array, positions: Array, segment_ids: Array, image_features: Array | None = None
    ) -> tuple[Array, dict]:
        d = self.config.decoder
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embedding = param_with_axes(
            self,
            "embedding",
            nn.initializers.normal(0.02),
            (d.vocab_size, d.embed_dim),
            ("vocab", "embed"),
            self.param_dtype,
        )
        x = jnp.take(embedding, ids, axis=0).astype(self.dtype)
        if image_features is not None:
            x = splice_image_features(x, ids, image_features, self.config.image_token_id)
        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
        block_cls = DecoderBlock
        if self.config.remat != "none" and not self.decode:
            block_cls = nn.remat(DecoderBlock, policy=REMAT_POLICIES[self.config.remat])
        moe_at = set(moe_layer_indices(d.moe_layers, d.num_layers))
        metrics = {}
        for i in range(d.num_layers):
            x, m = block_cls(
                self.config,
                i in moe_at,
                self.train,
                self.decode,
                self.max_len,
                self.packed,
                self.mesh,
                name=f"layers_{i}",
                **kw,
            )(x, positions, segment_ids)
            if m is not None:
                metrics[f"decoder/layers_{i}"] = m
        x = _norm(self.config, "final_norm", kw, self.mesh)(x)
        if self.return_hidden:
            return x, metrics
        if d.tie_embeddings:
            logits = matmul.dense(x, embedding.astype(self.dtype).T)
        else:
            head = param_with_axes(
                self,
                "lm_head",
                nn.initializers.normal(0.02),
                (d.embed_dim, d.vocab_size),
                ("embed", "vocab"),
                self.param_dtype,
            )
            logits = matmul.dense(x, head.astype(self.dtype))
        if variant(d, "head_bias"):
            bias = param_with_axes(
                self, "lm_head_bias", nn.initializers.zeros, (d.vocab_size,), ("vocab",),
                self.param_dtype,
            )
            logits = logits + bias.astype(self.dtype)
        logits = nn.with_logical_constraint(
            logits, ("activation_batch", "activation_length", "activation_vocab")
        )
        return logits.astype(jnp.float32), metrics


def head_weights(params: dict, d: Any) -> tuple[Array, Array | None]:
    """The LM head of the decoder's `params` as (weight [embed, vocab], bias [vocab] or None):
    `lm_head`, or the tied embedding transposed, and `lm_head_bias` where the variant has one."""
    head = params["embedding"].T if d.tie_embeddings else params["lm_head"]
    return head, params["lm_head_bias"] if variant(d, "head_bias") else None
