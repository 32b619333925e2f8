"""Dropless expert parallelism: (token, choice) pairs go to their experts' devices and back.

Runs inside `jax.shard_map` over the batch axes, with the expert weights split over `axis`
('expert', n devices, E / n experts each). Per device, with T local tokens and top-k:

1. sort the T*k pairs by expert; `group_sizes[E]` counts them. Experts are laid out device-major,
   so the pairs for device j are one contiguous run: `send_sizes[j]` rows from `input_offsets[j]`.
2. an `all_to_all` of `group_sizes.reshape(n, E/n)` tells every device how many rows each source
   sends to each of its experts (`recv_counts[i, e]`); the receiver places source i's run at
   `recv_offsets[i]` (sources in order) and a second `all_to_all` tells the sender that offset.
3. the rows move with `exchange` (ragged all-to-all semantics) into a buffer of n*T*k rows (the
   worst case: every pair of every source picks this device, so nothing is ever dropped).
4. the buffer is sorted by local expert and the local experts run as one grouped matmul.
5. results go back by the reverse exchange, are unsorted and combined with the routing weights.

`exchange` is `jax.lax.ragged_all_to_all` on GPU/TPU, or `buffered_ragged_all_to_all` (the same
semantics from a fixed-size `all_to_all`; XLA:CPU has no ragged-all-to-all), so both run the
offsets code above. No expert weight leaves its device.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def default_ep_dispatch(platform: str) -> str:
    """`auto`: ragged all-to-all where XLA implements it (GPU, TPU), the buffered path on CPU."""
    return "a2a_buffer" if platform == "cpu" else "ragged_a2a"


def buffered_ragged_all_to_all(
    operand: Array,
    output: Array,
    input_offsets: Array,
    send_sizes: Array,
    output_offsets: Array,
    recv_sizes: Array,
    axis_name: str,
    max_send: int,
) -> Array:
    """`jax.lax.ragged_all_to_all` semantics with one fixed-size `all_to_all`.

    Every run of `send_sizes[j] <= max_send` rows is packed into slot j of an [n, max_send, ...]
    buffer; after the all_to_all, slot i holds what source i sent here, written to `output` at the
    offset source i was given for this device (itself exchanged with an all_to_all). Costs n *
    max_send rows of traffic and memory instead of the rows actually sent.
    """
    p = jnp.arange(max_send)
    src = input_offsets[:, None] + p[None, :]  # [n, max_send]
    live = (p[None, :] < send_sizes[:, None])[(...,) + (None,) * (operand.ndim - 1)]
    packed = jnp.where(live, operand[jnp.clip(src, 0, operand.shape[0] - 1)], 0)
    got = jax.lax.all_to_all(packed, axis_name, 0, 0, tiled=True)  # [n, max_send, ...]
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    arrived = p[None, :] < recv_sizes[:, None]
    dest = jnp.where(arrived, offsets[:, None] + p[None, :], output.shape[0])  # else dropped
    return output.at[dest.reshape(-1)].set(got.reshape(-1, *got.shape[2:]), mode="drop")


def _exchange(kind: str, axis_name: str, max_send: int) -> Callable[..., Array]:
    if kind == "ragged_a2a":
        return lambda *args: jax.lax.ragged_all_to_all(*args, axis_name=axis_name)
    if kind == "a2a_buffer":
        return lambda *args: buffered_ragged_all_to_all(*args, axis_name, max_send)
    raise ValueError(f"unknown expert-parallel exchange {kind!r}; use 'ragged_a2a' or 'a2a_buffer'")


def exclusive_cumsum(x: Array) -> Array:
    return jnp.cumsum(x) - x


def dropless_expert_parallel(
    compute: Callable[[Array, Array, Array], Array],
    x: Array,
    expert_ids: Array,
    combine: Array,
    num_experts: int,
    axis_name: str,
    exchange: str,
) -> Array:
    """The dropless MoE of this device's tokens with experts spread over `axis_name`.

    x: [T, d]; expert_ids, combine: [T, k] (global expert ids). `compute(rows, group_sizes,
    group_ids)` runs the local experts on rows sorted by local expert (group_sizes: [E/n]) and
    returns [rows, d_out]; rows past sum(group_sizes) are padding and their results unused.
    """
    tokens, k = expert_ids.shape
    n = jax.lax.axis_size(axis_name)
    local = num_experts // n
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = x[order // k]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    per_device = group_sizes.reshape(n, local)
    send_sizes = per_device.sum(1)
    input_offsets = exclusive_cumsum(send_sizes)
    recv_counts = jax.lax.all_to_all(per_device, axis_name, 0, 0, tiled=True)  # [n, local]
    recv_sizes = recv_counts.sum(1)
    recv_offsets = exclusive_cumsum(recv_sizes)
    output_offsets = jax.lax.all_to_all(recv_offsets, axis_name, 0, 0, tiled=True)
    # Where this device's runs come back from: each receiver's input offset of my run.
    return_offsets = jax.lax.all_to_all(input_offsets, axis_name, 0, 0, tiled=True)

    pairs = tokens * k
    capacity = n * pairs
    send = _exchange(exchange, axis_name, pairs)
    received = send(
        rows,
        jnp.zeros((capacity, *rows.shape[1:]), rows.dtype),
        input_offsets,
        send_sizes,
        output_offsets,
        recv_sizes,
    )
    # The buffer holds, source by source, each source's rows sorted by local expert.
    ends = jnp.cumsum(recv_counts.reshape(-1))
    run = jnp.searchsorted(ends, jnp.arange(capacity), side="right")
    local_ids = jnp.where(run < n * local, run % local, local)  # padding rows: `local`, last
    local_order = jnp.argsort(local_ids, stable=True)
    sorted_ids = jnp.minimum(local_ids[local_order], local - 1)
    y_sorted = compute(received[local_order], recv_counts.sum(0), sorted_ids)
    y = jnp.zeros_like(y_sorted).at[local_order].set(y_sorted)
    back = send(
        y,
        jnp.zeros((pairs, *y.shape[1:]), y.dtype),
        recv_offsets,
        recv_sizes,
        return_offsets,
        send_sizes,
    )
    out = jnp.zeros_like(back).at[order].set(back).reshape(tokens, k, -1)
    return jnp.einsum("tkd,tk->td", out, combine.astype(out.dtype))
