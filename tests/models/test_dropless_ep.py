"""The buffered ragged all-to-all against `jax.lax.ragged_all_to_all`'s documented example, and
the dropless expert-parallel layer on a vmapped axis against the one-device layer.

The collectives run under `jax.vmap(..., axis_name=...)`, which emulates the devices of an axis
without a mesh (the 8-fake-device whole-model check is tests/models/test_sharding.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moe_lvlm.models.dropless_ep import buffered_ragged_all_to_all, dropless_expert_parallel
from moe_lvlm.models.moe import dropless_moe, experts_grouped


def test_buffered_exchange_reproduces_the_documented_example():
    """The two-instance example of jax.lax.ragged_all_to_all's docstring."""
    operand = jnp.array([[1, 2, 2], [3, 4, 0]])
    output = jnp.zeros((2, 4), operand.dtype)
    input_offsets = jnp.array([[0, 1], [0, 1]])
    send_sizes = jnp.array([[1, 2], [1, 1]])
    output_offsets = jnp.array([[0, 0], [1, 2]])
    recv_sizes = jnp.array([[1, 1], [2, 1]])
    exchange = functools.partial(buffered_ragged_all_to_all, axis_name="x", max_send=3)
    got = jax.vmap(exchange, axis_name="x")(
        operand, output, input_offsets, send_sizes, output_offsets, recv_sizes
    )
    np.testing.assert_array_equal(got, [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_expert_parallel_layer_equals_one_device():
    """4 'devices' with 2 of 8 experts each, skewed routing (one expert takes many pairs, one
    none): output and gradients equal the dropless layer on all tokens."""
    rng = np.random.default_rng(0)
    n, tokens, k, num_experts, d, f = 4, 12, 2, 8, 16, 24
    ids = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(n * tokens)])
    ids[:20] = [3, 5]
    ids[ids == 6] = 7
    ids = jnp.asarray(ids, jnp.int32)
    x = jnp.asarray(rng.normal(size=(n * tokens, d)), jnp.float32)
    combine = jnp.asarray(rng.uniform(size=(n * tokens, k)), jnp.float32)
    w = {name: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[1]), jnp.float32)
         for name, shape in [("gate", (num_experts, d, f)), ("up", (num_experts, d, f)),
                             ("down", (num_experts, f, d))]}

    def one_device(w, x):
        return jnp.sum(jnp.sin(dropless_moe(w, x, ids, combine, "silu", True)))

    def expert_parallel(w, x):
        def device(x, ids, combine, w_local):
            compute = functools.partial(experts_grouped, w_local, activation="silu", gated=True)
            return dropless_expert_parallel(
                compute, x, ids, combine, num_experts, "x", "a2a_buffer"
            )

        split = lambda t: t.reshape(n, -1, *t.shape[1:])  # noqa: E731
        y = jax.vmap(device, axis_name="x")(
            split(x), split(ids), split(combine), jax.tree_util.tree_map(split, w)
        )
        return jnp.sum(jnp.sin(y))

    want = jax.value_and_grad(one_device, argnums=(0, 1))(w, x)
    got = jax.jit(jax.value_and_grad(expert_parallel, argnums=(0, 1)))(w, x)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
