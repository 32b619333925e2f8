"""Attention kernels of the training forward pass and the per-platform choice among them.

`model.attention` names one of IMPLEMENTATIONS:
  auto       per platform (`resolve`): 'splash' on TPU; on CPU 'native' where the kernel
             builds and supports the head size, else 'blockwise'; on GPU 'cudnn' for 16-bit
             compute, 'xla' for fp32.
  xla        `jax.nn.dot_product_attention`'s XLA path: the full [batch, heads, q, kv] scores and
             a [batch, 1, q, kv] mask (the reference).
  cudnn      cuDNN fused attention (GPU, 16-bit compute).
  blockwise  flash-style attention in plain JAX (`blockwise_attention`): query blocks against
             key/value blocks with an online softmax, causal blocks above the diagonal never
             computed, the segment-id mask built per block inside the score computation, and a
             custom VJP that recomputes the scores from the saved log-sum-exp, so that no
             [q, kv] tensor outlives its block in the forward or the backward pass.
  splash     Pallas TPU splash attention (moe_lvlm/models/splash.py), sharded over the mesh;
             interpret mode off TPU (tests).
  native     CPU: a fused C++ flash-attention kernel (forward and backward, float32) called
             through `jax.ffi` (moe_lvlm/kernels/native_attention.py), built with g++ on first
             use (moe_lvlm/kernels/build.py; MOE_LVLM_NATIVE_KERNELS=0 turns it off); sharded
             over the mesh's batch axes. It also applies the decoder's qk-norm and RoPE to q
             and k as it loads them (`qk_norm=`, `rope=`), so no normalised or rotated copy is
             written in XLA.

Queries that may see no key (padding of packed rows) get a zero output in 'blockwise', as in
the numpy reference; the XLA path gives them a uniform average. Either way nothing reads them.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from moe_lvlm.config import ATTENTIONS
from moe_lvlm.kernels import native_attention as native
from moe_lvlm.models.recompute import after
from moe_lvlm.models.splash import splash_attention

Array = jax.Array

IMPLEMENTATIONS = ATTENTIONS
# Block sizes of 'blockwise' (tokens). On the 2-core CPU box (benchmarks/RESULTS.md, a loaded
# box) query blocks of 128 against the causal prefix in key blocks of up to 1024 beat 256/1024
# in time and memory at seq 1024.
BLOCK_Q = 128
BLOCK_KV = 1024


def resolve(
    implementation: str, dtype=jnp.float32, platform: str | None = None, *,
    head_dim: int | None = None,
) -> str:
    """The concrete implementation that `implementation` ('auto' or a concrete one) runs as, for
    heads of `head_dim` (None: not known; CPU then stays on 'blockwise')."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention {implementation!r}; choose one of {IMPLEMENTATIONS}"
        )
    if implementation != "auto":
        return implementation
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "splash"
    if platform == "cpu":
        # benchmarks/RESULTS.md, sixth session: faster in the step at every measured shape.
        return "native" if head_dim in native.HEAD_DIMS and native.available() else "blockwise"
    if platform == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    return "xla"


def segment_mask(segment_ids: Array, causal: bool) -> Array:
    """Boolean mask [batch, 1, q, kv]: same non-padding segment (packing), and causal if asked."""
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = mask & (segment_ids[:, None, :] > 0)
    if causal:
        seq = segment_ids.shape[1]
        mask = mask & jnp.tril(jnp.ones((seq, seq), dtype=bool))[None]
    return mask[:, None]


def self_attention(
    q: Array, k: Array, v: Array, *, segment_ids: Array | None, causal: bool,
    implementation: str, mesh: Mesh | None = None, rope: tuple[Array, Array] | None = None,
    qk_norm: tuple[Array, Array, float] | None = None,
) -> Array:
    """q [b, s, heads, d], k/v [b, s, kv_heads, d] -> [b, s, heads, d] with the concrete
    `implementation` (see `resolve`). `segment_ids` [b, s] (0 = padding) confine attention to
    a segment; None: every position of the row is one segment. `mesh`: splash's shard_map.
    `rope` (positions, inv_freq) and `qk_norm` (q_scale, k_scale, eps): 'native' only, q and k
    normalised and rotated inside the kernel."""
    if (rope is not None or qk_norm is not None) and implementation != "native":
        raise ValueError(f"rope / qk-norm inside attention need 'native', not {implementation!r}")
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, causal=causal)
    if implementation == "splash":
        return splash_attention(q, k, v, segment_ids, causal, mesh)
    if implementation == "native":
        return native.native_attention(q, k, v, segment_ids, causal=causal, mesh=mesh, rope=rope,
                                       qk_norm=qk_norm)
    mask = None if segment_ids is None else segment_mask(segment_ids, causal)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal and mask is None,
        implementation=None if implementation == "xla" else implementation,
    )


# --------------------------------------------------------------------------- blockwise
def blockwise_attention(
    q: Array, k: Array, v: Array, segment_ids: Array | None = None, *, causal: bool = True,
    block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV,
) -> Array:
    """Flash-style self-attention. q [b, s, heads, d], k/v [b, s, kv_heads, d] (heads a multiple
    of kv_heads: query head h reads kv head h // (heads / kv_heads)); segment_ids [b, s] or None.
    Scores and softmax in float32; any s (padded to whole query blocks inside)."""
    b, s, h, d = q.shape
    kh = k.shape[2]
    if h % kh:
        raise ValueError(f"{h} query heads are not a multiple of {kh} key/value heads")
    bq = min(block_q, s)
    bk = min(block_kv, s)
    pad = -s % bq
    if pad and segment_ids is None and not causal:
        segment_ids = jnp.ones((b, s), jnp.int32)  # keys past the end are masked as padding
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    # [b, kv_heads, group, s, d] and [b, kv_heads, s, d]: the layouts every block uses.
    qt = q.reshape(b, s + pad, kh, h // kh, d).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out = _flash(causal, bq, bk, qt, kt, vt, segment_ids)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s + pad, h, d)[:, :s]


def _kv_blocks(i: int, bq: int, bk: int, length: int, causal: bool):
    """(start, end, needs_causal_mask) of the key blocks query block i reads."""
    q0, q1 = i * bq, (i + 1) * bq
    limit = q1 if causal else length
    blocks = []
    for a in range(0, limit, bk):
        e = min(a + bk, limit)
        blocks.append((a, e, causal and e - 1 > q0))
    return blocks


def _block_mask(seg, i, bq, a, e, causal_mask):
    """[b or 1, 1, 1, bq, e - a] bool, or None when every score of the block is allowed."""
    mask = None
    if seg is not None:
        sq, sk = seg[:, i * bq:(i + 1) * bq], seg[:, a:e]
        mask = (sq[:, :, None] == sk[:, None, :]) & (sk[:, None, :] > 0)
        mask = mask[:, None, None]
    if causal_mask:
        rows = np.arange(i * bq, (i + 1) * bq)[:, None]
        tri = jnp.asarray(rows >= np.arange(a, e)[None, :])[None, None, None]
        mask = tri if mask is None else mask & tri
    return mask


def _scores(qb, kb, mask):
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qb, kb, preferred_element_type=jnp.float32)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _scale(qt):
    return (qt * (1.0 / math.sqrt(qt.shape[-1]))).astype(qt.dtype)


def _forward(causal, bq, bk, qt, kt, vt, seg):
    length = qt.shape[3]
    qs = _scale(qt)
    outs, lses = [], []
    for i in range(length // bq):
        qb = qs[:, :, :, i * bq:(i + 1) * bq]
        m = denom = acc = None
        for a, e, cm in _kv_blocks(i, bq, bk, length, causal):
            s = _scores(qb, kt[:, :, a:e], _block_mask(seg, i, bq, a, e, cm))
            m_new = jnp.max(s, axis=-1) if m is None else jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that saw no key yet
            p = jnp.exp(s - m_safe[..., None])
            pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(vt.dtype), vt[:, :, a:e],
                            preferred_element_type=jnp.float32)
            if m is None:
                denom, acc = jnp.sum(p, axis=-1), pv
            else:
                corr = jnp.exp(m - m_safe)
                denom = denom * corr + jnp.sum(p, axis=-1)
                acc = acc * corr[..., None] + pv
            m = m_new
        seen = denom > 0
        outs.append((acc / jnp.where(seen, denom, 1.0)[..., None]).astype(qt.dtype))
        lses.append(jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), jnp.inf))
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(causal, bq, bk, qt, kt, vt, seg):
    return _forward(causal, bq, bk, qt, kt, vt, seg)[0]


def _flash_fwd(causal, bq, bk, qt, kt, vt, seg):
    out, lse = _forward(causal, bq, bk, qt, kt, vt, seg)
    return out, (qt, kt, vt, seg, out, lse)


def _flash_bwd(causal, bq, bk, res, dout):
    qt, kt, vt, seg, out, lse = res
    # Recomputed from `dout` on: XLA:CPU would otherwise merge the scores and key/value slices
    # with the forward's and keep every layer's blocks alive at once (moe_lvlm/models/recompute.py).
    qt, kt, vt = after(dout, qt, kt, vt)
    length = qt.shape[3]
    scale = 1.0 / math.sqrt(qt.shape[-1])
    qs = _scale(qt)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dqs, dk_parts, dv_parts = [], {}, {}
    for i in range(length // bq):
        rows = slice(i * bq, (i + 1) * bq)
        qb, dob = qs[:, :, :, rows], dout[:, :, :, rows]
        lse_b, delta_b = lse[:, :, :, rows, None], delta[:, :, :, rows, None]
        dq = None
        for a, e, cm in _kv_blocks(i, bq, bk, length, causal):
            kb, vb = kt[:, :, a:e], vt[:, :, a:e]
            p = jnp.exp(_scores(qb, kb, _block_mask(seg, i, bq, a, e, cm)) - lse_b)
            dv = jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(dob.dtype), dob,
                            preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhgqd,bhkd->bhgqk", dob, vb, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_b)).astype(qt.dtype)
            dq_part = jnp.einsum("bhgqk,bhkd->bhgqd", ds, kb, preferred_element_type=jnp.float32)
            dk = jnp.einsum("bhgqk,bhgqd->bhkd", ds, qb, preferred_element_type=jnp.float32)
            dq = dq_part if dq is None else dq + dq_part
            dk_parts.setdefault(a, []).append(dk)
            dv_parts.setdefault(a, []).append(dv)
        dqs.append(dq * scale)

    def gather(parts):
        blocks = []
        for a in sorted(parts):
            width = max(x.shape[2] for x in parts[a])
            padded = [jnp.pad(x, ((0, 0), (0, 0), (0, width - x.shape[2]), (0, 0)))
                      for x in parts[a]]
            blocks.append(functools.reduce(jnp.add, padded))
        return jnp.concatenate(blocks, axis=2)

    dq = jnp.concatenate(dqs, axis=3).astype(qt.dtype)
    return dq, gather(dk_parts).astype(kt.dtype), gather(dv_parts).astype(vt.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
