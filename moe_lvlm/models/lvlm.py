"""The vision-language model: ViT -> projector -> image features spliced into the decoder input."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moe_lvlm.config import num_image_tokens
from moe_lvlm.models.decoder import Decoder
from moe_lvlm.models.projector import Projector
from moe_lvlm.models.vit import VisionEncoder

Array = jax.Array


class LVLM(nn.Module):
    """(input_ids, positions, segment_ids [batch, seq], images [batch, M, H, W, 3] or None)
    -> (logits [batch, seq, vocab] float32, {moe layer path: metrics}).

    The j-th `image_token_id` position of row b receives the j-th image feature of row b (image 0's
    tokens first). Rows without placeholders ignore their (zero) images, and images that no
    placeholder uses are left out of the vision and projector MoE losses and metrics.
    `return_hidden`: the decoder's final-normed hidden states instead of the logits (`Decoder`).
    """

    config: Any  # FrozenConfigDict of the model section
    mesh: Any = None

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        positions: Array,
        segment_ids: Array,
        images: Array | None = None,
        *,
        train: bool = False,
        packed: bool = False,
        decode: bool = False,
        max_len: int = 0,
        return_hidden: bool = False,
    ) -> tuple[Array, dict[str, dict[str, Array]]]:
        cfg = self.config
        kw = dict(
            dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), mesh=self.mesh
        )
        metrics, features = {}, None
        if images is not None:
            b, m = images.shape[:2]
            placeholders = jnp.sum(input_ids == cfg.image_token_id, axis=1)  # [b]
            used = placeholders[:, None] > jnp.arange(m) * num_image_tokens(cfg)  # [b, m]
            vision, vision_metrics = VisionEncoder(cfg, train, name="vision", **kw)(
                images.reshape(b * m, *images.shape[2:]), used.reshape(b * m)
            )
            features, projector_metrics = Projector(cfg, train, name="projector", **kw)(
                vision, jnp.broadcast_to(used.reshape(b * m, 1), vision.shape[:2])
            )
            features = features.reshape(b, -1, features.shape[-1])
            metrics.update(vision_metrics, **projector_metrics)
        logits, decoder_metrics = Decoder(
            cfg, train, decode, max_len, packed, name="decoder", return_hidden=return_hidden, **kw
        )(input_ids, positions, segment_ids, features)
        metrics.update(decoder_metrics)
        return logits, metrics


def build_model(model_config: ml_collections.ConfigDict, mesh: Any = None) -> LVLM:
    if model_config.image_token_id < 0:
        raise ValueError(
            "model.image_token_id is not set; it comes from the tokenizer's image placeholder id"
        )
    return LVLM(ml_collections.FrozenConfigDict(model_config), mesh)


def moe_loss_sums(metrics: dict[str, dict[str, Array]]) -> tuple[Array, Array]:
    """Sum of the load-balancing and z losses over every MoE layer."""
    balance = sum((m["balance_loss"] for m in metrics.values()), jnp.zeros((), jnp.float32))
    z = sum((m["z_loss"] for m in metrics.values()), jnp.zeros((), jnp.float32))
    return balance, z
