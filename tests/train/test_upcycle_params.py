"""`stages.upcycle` on hand-made parameter trees: experts are copies of the dense FFN, a part
the source lacks altogether keeps its fresh parameters, a missing FFN in a present part is an
error."""

import jax
import numpy as np
import pytest

from moe_lvlm.train import stages as stages_lib

E, D, F = 3, 2, 4


def fresh_moe():
    """A fresh MoE model: a vision part and a decoder whose layer 0 is MoE (E experts)."""
    return {
        "vision": {"patch_embed": {"kernel": np.full((D, D), 7.0, np.float32)}},
        "decoder": {"layers_0": {"moe": {
            "router": {"kernel": np.full((D, E), 5.0, np.float32)},
            "experts": {"down": np.full((E, F, D), 9.0, np.float32)},
        }}},
    }


def test_experts_copy_the_dense_ffn_and_a_missing_part_stays_fresh():
    down = np.arange(F * D, dtype=np.float32).reshape(F, D)
    dense = {"decoder": {"layers_0": {"mlp": {"down": {"kernel": down}}}}}  # no vision part
    out = stages_lib.upcycle(dense, fresh_moe(), 0.0, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out["decoder"]["layers_0"]["moe"]["experts"]["down"],
                                  np.stack([down] * E))
    np.testing.assert_array_equal(out["decoder"]["layers_0"]["moe"]["router"]["kernel"], 5.0)
    np.testing.assert_array_equal(out["vision"]["patch_embed"]["kernel"], 7.0)


def test_a_vision_only_source_leaves_the_moe_decoder_fresh():
    vision = {"vision": {"patch_embed": {"kernel": np.ones((D, D), np.float32)}}}
    out = stages_lib.upcycle(vision, fresh_moe(), 0.0, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out["vision"]["patch_embed"]["kernel"], 1.0)
    np.testing.assert_array_equal(out["decoder"]["layers_0"]["moe"]["experts"]["down"], 9.0)


def test_a_decoder_without_the_dense_ffn_is_an_error():
    dense = {"decoder": {"layers_1": {"mlp": {"down": {"kernel": np.ones((F, D), np.float32)}}}}}
    with pytest.raises(ValueError, match="decoder/layers_0/mlp/down/kernel"):
        stages_lib.upcycle(dense, fresh_moe(), 0.0, jax.random.PRNGKey(0))
