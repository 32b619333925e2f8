"""Blockwise attention (moe_lvlm/models/attention.py) and the native C++ kernel
(moe_lvlm/kernels) against attention and its gradients written out in numpy: causal and not,
packed segments with padding (queries that see no key), grouped-query heads, lengths that are
not a multiple of the block or tile; and the per-platform choice of `model.attention='auto'`."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from moe_lvlm.kernels import build, native_attention
from moe_lvlm.models import attention
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
