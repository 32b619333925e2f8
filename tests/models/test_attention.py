"""Blockwise attention (moe_lvlm/models/attention.py) and the native C++ kernel
(moe_lvlm/kernels) against attention and its gradients written out in numpy: causal and not,
packed segments with padding (queries that see no key), grouped-query heads, lengths that are
not a multiple of the block or tile; and the per-platform choice of `model.attention='auto'`."""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from moe_lvlm.kernels import build, native_attention
from moe_lvlm.models import attention, layers
from moe_lvlm.models.lvlm import build_model


def allowed_keys(segment_ids, seq, causal):
    """[b, q, kv] bool: same non-padding segment (or all keys), causal if asked."""
    if segment_ids is None:
        allowed = np.ones((1, seq, seq), bool)
    else:
        allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (
            segment_ids[:, None, :] > 0
        )
    return allowed & np.tri(seq, dtype=bool) if causal else allowed


def np_attention(q, k, v, dout, allowed):
    """Output and (dq, dk, dv) for the cotangent `dout`; a query that sees no key outputs 0."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    out, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    for bi, hi in np.ndindex(b, h):
        kh = hi // group
        mask = allowed[bi % allowed.shape[0]]
        scores = np.where(mask, q[bi, :, hi] @ k[bi, :, kh].T / np.sqrt(d), -np.inf)
        seen = mask.any(-1)
        p = np.zeros_like(scores)
        e = np.exp(scores[seen] - scores[seen].max(-1, keepdims=True))
        p[seen] = e / e.sum(-1, keepdims=True)
        out[bi, :, hi] = p @ v[bi, :, kh]
        do = dout[bi, :, hi]
        dv[bi, :, kh] += p.T @ do
        dp = do @ v[bi, :, kh].T
        ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(d)
        dq[bi, :, hi] = ds @ k[bi, :, kh]
        dk[bi, :, kh] += ds.T @ q[bi, :, hi]
    return out, (dq, dk, dv)


def random_case(seq, packed, b=2, heads=4, kv_heads=2, d=8):
    """q, k, v, a cotangent and (if packed) segment ids with padding, grouped-query heads."""
    rng = np.random.default_rng(seq)
    q = rng.standard_normal((b, seq, heads, d)).astype(np.float32)
    k = rng.standard_normal((b, seq, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((b, seq, kv_heads, d)).astype(np.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    segments = None
    if packed:
        segments = np.ones((b, seq), np.int32)
        segments[0, seq // 3:] = 2
        segments[0, -2:] = 0  # padding at the end of a packed row
        segments[1, seq // 2:] = 0
    return q, k, v, dout, segments


def check_against_numpy(fn, q, k, v, dout, segments, causal):
    out, vjp = jax.vjp(fn, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    grads = vjp(jnp.asarray(dout))
    want_out, want_grads = np_attention(q, k, v, dout, allowed_keys(segments, q.shape[1], causal))
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "seq, block_q, block_kv, causal, packed",
    [
        (16, 4, 4, True, False),  # square blocks, causal blocks skipped
        (19, 4, 8, True, True),  # length not a multiple of the block, packing with padding
        (13, 5, 3, False, True),  # bidirectional (ViT-style), key blocks smaller than queries
        (11, 4, 4, False, False),  # bidirectional with padded keys masked
        (12, 64, 64, True, True),  # one block larger than the sequence
    ],
)
def test_blockwise_matches_numpy(seq, block_q, block_kv, causal, packed):
    q, k, v, dout, segments = random_case(seq, packed)

    def run(q_, k_, v_):
        seg = None if segments is None else jnp.asarray(segments)
        return attention.blockwise_attention(
            q_, k_, v_, seg, causal=causal, block_q=block_q, block_kv=block_kv
        )

    check_against_numpy(run, q, k, v, dout, segments, causal)


@pytest.mark.parametrize(
    "seq, causal, packed, d",
    [
        (16, True, False, 8),  # one tile
        (19, True, True, 8),  # packing with padding
        (13, False, True, 16),  # bidirectional (ViT-style)
        (11, False, False, 8),  # bidirectional, every key of the row
        (150, True, True, 32),  # three 64-token tiles, the last partial; causal tiles skipped
        (130, False, False, 8),  # bidirectional across partial tiles
        (100, True, True, 16),  # 32-token tiles (rows up to 128), the last partial
    ],
)
def test_native_matches_numpy(seq, causal, packed, d):
    q, k, v, dout, segments = random_case(seq, packed, d=d)

    def run(q_, k_, v_):
        seg = None if segments is None else jnp.asarray(segments)
        return native_attention.native_attention(q_, k_, v_, seg, causal=causal)

    check_against_numpy(run, q, k, v, dout, segments, causal)


def np_rope(x, positions, theta, rotary, inverse=False):
    """x [b, s, heads, d] float64 rotated (HF rotate_half) over its first `rotary` features by
    float32(position) * inv_freq (float32, as the model computes them); by minus it if inverse."""
    half = rotary // 2
    inv_freq = (1.0 / theta ** (np.arange(half) * 2.0 / rotary)).astype(np.float32)
    angles = (positions.astype(np.float32)[..., None] * inv_freq).astype(np.float64)
    cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    sin = -sin if inverse else sin
    x1, x2 = x[..., :half], x[..., half:rotary]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary:]], -1)


def packed_positions(segments, seq, b):
    """Positions restarting at 0 with every segment (as packed rows get them), 0 on padding."""
    if segments is None:
        return np.broadcast_to(np.arange(seq, dtype=np.int32), (b, seq)).copy()
    positions = np.zeros((b, seq), np.int32)
    for bi in range(b):
        start = 0
        for i in range(1, seq + 1):
            if i == seq or segments[bi, i] != segments[bi, start]:
                positions[bi, start:i] = np.arange(i - start) if segments[bi, start] else 0
                start = i
    return positions


@pytest.mark.parametrize(
    "seq, causal, packed, d, fraction, offset",
    [
        (19, True, True, 8, 1.0, 0),  # packed rows: positions restart per segment, padding
        (150, True, True, 32, 1.0, 0),  # three 64-token tiles, the last partial
        (40, False, False, 16, 0.5, 1000),  # bidirectional, half the features rotated, far angles
        (100, True, False, 64, 1.0, 7),  # 32-token tiles, d 64
    ],
)
def test_native_rope_matches_numpy(seq, causal, packed, d, fraction, offset):
    """RoPE applied inside the kernel: output and gradients with respect to the un-rotated q and
    k equal rope + attention written out in float64 numpy."""
    q, k, v, dout, segments = random_case(seq, packed, d=d)
    positions = packed_positions(segments, seq, q.shape[0]) + offset
    theta, rotary = 10000.0, int(d * fraction)
    inv_freq = layers.rope_frequencies(rotary, theta)

    def run(q_, k_, v_):
        seg = None if segments is None else jnp.asarray(segments)
        return native_attention.native_attention(
            q_, k_, v_, seg, causal=causal, rope=(jnp.asarray(positions), inv_freq))

    out, vjp = jax.vjp(run, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    dq, dk, dv = vjp(jnp.asarray(dout))
    q64, k64 = (np_rope(x.astype(np.float64), positions, theta, rotary) for x in (q, k))
    want_out, (dq_rot, dk_rot, want_dv) = np_attention(
        q64, k64, v.astype(np.float64), dout.astype(np.float64),
        allowed_keys(segments, seq, causal))
    want_dq, want_dk = (np_rope(g, positions, theta, rotary, inverse=True)
                        for g in (dq_rot, dk_rot))
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5, rtol=1e-4)
    for got, want in ((dq, want_dq), (dk, want_dk), (dv, want_dv)):
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("fraction, qk_norm", [(1.0, True), (0.25, False)])
def test_attention_layer_native_rope_matches_blockwise(fraction, qk_norm):
    """`Attention` with native (qk-norm and RoPE in the kernel) against blockwise (both in XLA):
    same parameters, same output and gradients (inputs and every parameter, the norm scales
    too), packed rows; no norm or rotation is left in XLA."""
    b, s, embed = 2, 24, 32
    x = jax.random.normal(jax.random.PRNGKey(0), (b, s, embed))
    segments = np.ones((b, s), np.int32)
    segments[0, 10:] = 2
    segments[1, 20:] = 0
    positions = jnp.asarray(packed_positions(segments, s, b))
    segments = jnp.asarray(segments)

    def layer(implementation):
        return layers.Attention(num_heads=4, num_kv_heads=2, head_dim=16, causal=True,
                                rope_theta=500.0, rotary_fraction=fraction, qk_norm=qk_norm,
                                implementation=implementation)

    params = layer("blockwise").init(jax.random.PRNGKey(1), x, positions, segments)

    weight = jax.random.normal(jax.random.PRNGKey(2), (embed,))

    def loss(implementation, params_, x_):
        out = layer(implementation).apply(params_, x_, positions, segments)
        return jnp.sum(out * weight), out

    want_grads, want = jax.grad(functools.partial(loss, "blockwise"), (0, 1), has_aux=True)(
        params, x)
    got_grads, got = jax.grad(functools.partial(loss, "native"), (0, 1), has_aux=True)(params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=2e-4)
    jaxpr = str(jax.make_jaxpr(functools.partial(loss, "native"))(params, x))
    target = "norm_rope_forward" if qk_norm else "rope_forward"
    assert f"moe_lvlm_attention_{target}" in jaxpr
    assert not re.search(r"\b(cos|sin|rsqrt)\b", jaxpr)  # no norm or rotation left in XLA


@pytest.mark.parametrize("seq, causal, packed, d, rope", [(19, True, True, 8, True),
                                                          (70, False, False, 32, False)])
def test_native_qk_norm_matches_references(seq, causal, packed, d, rope):
    """qk-norm (RMSNorm over the head with learned scales) inside the kernel, with or without
    RoPE: output against float64 numpy; gradients of q, k, v and both scales against jax.grad of
    the same written in JAX (norm, `layers.rope`, 'xla' attention)."""
    q, k, v, dout, segments = random_case(seq, packed, d=d)
    rng = np.random.default_rng(1)
    q_scale, k_scale = (1 + 0.3 * rng.standard_normal(d).astype(np.float32) for _ in range(2))
    positions = packed_positions(segments, seq, q.shape[0])
    eps, theta = 1e-6, 10000.0
    seg = None if segments is None else jnp.asarray(segments)
    fused_rope = (jnp.asarray(positions), layers.rope_frequencies(d, theta)) if rope else None

    def fused(q_, k_, v_, qs, ks):
        return native_attention.native_attention(q_, k_, v_, seg, causal=causal, rope=fused_rope,
                                                 qk_norm=(qs, ks, eps))

    def reference(q_, k_, v_, qs, ks):
        def norm(x, w):
            return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w
        q_, k_ = norm(q_, qs), norm(k_, ks)
        if rope:
            q_, k_ = (layers.rope(x, jnp.asarray(positions), theta) for x in (q_, k_))
        return attention.self_attention(q_, k_, v_, segment_ids=seg, causal=causal,
                                        implementation="xla")

    def np_norm(x, w):
        x = x.astype(np.float64)
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w
    qn, kn = np_norm(q, q_scale), np_norm(k, k_scale)
    if rope:
        qn, kn = (np_rope(x, positions, theta, d) for x in (qn, kn))
    want_out, _ = np_attention(qn, kn, v.astype(np.float64), dout.astype(np.float64),
                               allowed_keys(segments, seq, causal))
    inputs = [jnp.asarray(x) for x in (q, k, v, q_scale, k_scale)]
    out, vjp = jax.vjp(fused, *inputs)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5, rtol=1e-4)
    _, ref_vjp = jax.vjp(reference, *inputs)
    # 'xla' gives queries that see no key a uniform average (not 0): no cotangent for them.
    seen = allowed_keys(segments, seq, causal).any(-1)[..., None, None]
    dout = jnp.asarray(np.where(seen, dout, 0.0))
    for got, want in zip(vjp(dout), ref_vjp(dout), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=2e-4)


def test_native_bfloat16_inputs_cast_in_and_out():
    q, k, v, dout, segments = random_case(40, True)
    cast = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out = native_attention.native_attention(*cast, jnp.asarray(segments), causal=True)
    want, _ = np_attention(*[np.asarray(x, np.float32) for x in cast], dout,
                           allowed_keys(segments, 40, True))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


def test_native_build_failure_warns_and_returns_none(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_LVLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.warns(UserWarning, match="native kernel attention.cc unavailable"):
        assert build.load("attention.cc") is None
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("MOE_LVLM_NATIVE_KERNELS", "0")
    assert build.load("attention.cc") is None


def test_auto_resolves_per_platform(monkeypatch):
    assert attention.resolve("auto", jnp.float32, "cpu") == "blockwise"
    assert attention.resolve("auto", jnp.float32, "cpu", head_dim=32) == "native"
    assert attention.resolve("auto", jnp.bfloat16, "cpu", head_dim=16) == "native"
    assert attention.resolve("auto", jnp.float32, "cpu", head_dim=24) == "blockwise"
    monkeypatch.setattr(native_attention, "available", lambda: False)  # no compiler
    assert attention.resolve("auto", jnp.float32, "cpu", head_dim=32) == "blockwise"
    assert attention.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert attention.resolve("auto", jnp.float32, "gpu") == "xla"
    assert attention.resolve("xla", jnp.float32, "cpu") == "xla"
    with pytest.raises(ValueError, match="unknown attention"):
        attention.resolve("flash", jnp.float32, "cpu")


def test_model_default_runs_native_on_cpu(monkeypatch):
    """The presets' default ('auto') sends every attention layer of the model (ViT: head_dim 16,
    decoder: 32, packed rows) through the native kernel on CPU, and the logits equal the 'xla'
    reference's."""
    calls = []
    original = native_attention.native_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(native_attention, "native_attention", spy)
    cfg = models.tiny()
    assert cfg.attention == "auto"
    cfg.image_token_id = cfg.decoder.vocab_size - 1
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, cfg.decoder.vocab_size - 1)
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    segments = jnp.concatenate([jnp.ones((2, 12), jnp.int32), jnp.full((2, 12), 2)], axis=1)
    images = jax.random.normal(jax.random.PRNGKey(2), (2, 1, 32, 32, 3))
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ids, positions, segments, images)
    calls.clear()
    logits, _ = jax.jit(functools.partial(model.apply, packed=True))(
        params, ids, positions, segments, images)
    decoder_calls = [shape for shape in calls if shape[1] == 24]
    assert len(decoder_calls) == cfg.decoder.num_layers and len(calls) > len(decoder_calls)
    cfg.attention = "xla"
    want, _ = jax.jit(functools.partial(build_model(cfg).apply, packed=True))(
        params, ids, positions, segments, images)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_native_sharded_over_batch_and_heads():
    """8 fake devices (native_sharding_check.py): the kernel under shard_map equals numpy, and
    the compiled program holds no collective."""
    proc = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "native_sharding_check.py")],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["worst_ratio"] <= 1, result
    assert result["collectives"] == [], result
    assert result["out_sharding"] == "P(('data', 'fsdp', 'expert'), None, 'tensor')"
