"""Splash attention: the Pallas TPU flash-attention kernel with block-sparse masks.

`splash_attention(q, k, v, segment_ids, causal, mesh)` is `model.attention='splash'`: causal or
full mask, packing by segment ids (a token attends only within its segment), grouped-query heads
(the kernel takes fewer kv heads than q heads). The kernel works on one example's
[heads, seq, head_dim], so it is vmapped over the batch and, with a mesh, run inside
`jax.shard_map` with the batch split over the batch axes and the heads over 'tensor'. Off TPU it
runs in Pallas interpret mode (slow; for tests).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_lvlm.parallel.mesh import BATCH_AXES

Array = jax.Array
SEQ_MULTIPLE = 128  # sequences are padded to a multiple of this (the smallest block)


def block_size(seq: int) -> int:
    """The q and kv block: the largest of 512, 256, 128 dividing `seq` (a multiple of 128)."""
    return next(b for b in (512, 256, 128) if seq % b == 0)


@functools.cache
def _kernel(num_heads: int, seq: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    one = masks.CausalMask((seq, seq)) if causal else masks.FullMask((seq, seq))
    b = block_size(seq)
    sizes = kernel.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    with jax.ensure_compile_time_eval():  # concrete mask tables, safe to cache across traces
        return kernel.make_splash_mha(
            masks.MultiHeadMask([one] * num_heads),
            block_sizes=sizes,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def _local_attention(q: Array, k: Array, v: Array, segment_ids: Array, causal: bool) -> Array:
    """One shard: q [b, s, h, d], k/v [b, s, kv_h, d], segment_ids [b, s] -> [b, s, h, d]."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
        SegmentIds,
    )

    kernel = _kernel(q.shape[2], q.shape[1], causal, jax.default_backend() != "tpu")
    heads_first = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731
    out = jax.vmap(kernel)(
        heads_first(q), heads_first(k), heads_first(v), SegmentIds(segment_ids, segment_ids)
    )
    return heads_first(out)


def splash_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array | None = None,
    causal: bool = True,
    mesh: Any = None,
) -> Array:
    """Softmax(q k^T / sqrt(d)) v with splash. q: [b, s, h, d]; k, v: [b, s, kv_h, d].

    `segment_ids` [b, s] (None: one segment) restricts attention to equal ids. The sequence is
    padded to a multiple of 128 with segment id 0 (pads attend only to pads; they are cut off),
    which keeps every query row non-empty as the kernel requires.
    """
    batch, seq, heads, head_dim = q.shape
    if segment_ids is None:
        segment_ids = jnp.ones((batch, seq), jnp.int32)
    padded = -(-seq // SEQ_MULTIPLE) * SEQ_MULTIPLE
    if padded != seq:
        pad = lambda t: jnp.pad(t, ((0, 0), (0, padded - seq)) + ((0, 0),) * (t.ndim - 2))  # noqa: E731
        q, k, v, segment_ids = pad(q), pad(k), pad(v), pad(segment_ids)
    q = (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype)
    body = functools.partial(_local_attention, causal=causal)
    if mesh is not None:
        tensor = mesh.shape["tensor"]
        if k.shape[2] % tensor:  # fewer kv heads than head shards: give each q head its own
            k, v = (jnp.repeat(t, heads // k.shape[2], axis=2) for t in (k, v))
        heads_spec = P(BATCH_AXES, None, "tensor")
        body = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(heads_spec, heads_spec, heads_spec, P(BATCH_AXES)),
            out_specs=heads_spec,
            check_vma=False,
        )
    return body(q, k, v, segment_ids.astype(jnp.int32))[:, :seq]
