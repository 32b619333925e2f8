"""The Pallas TPU kernels (interpret mode on CPU) against the XLA path.

Splash attention and the megablox grouped matmul alone (against numpy / jax.lax.ragged_dot), the
tile rule of megablox, and the tiny model's decoder (a dropless MoE block and a dense block) with
`attention='splash'` and `grouped_matmul='megablox'` equal to `xla`/`xla` in logits and
gradients on a packed text batch of sequence 256. (Interpret mode compiles slowly, so the
whole-model check leaves the ViT out; its non-causal, padded attention is checked alone.)
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from moe_lvlm.models import grouped_matmul as gm
from moe_lvlm.models.lvlm import build_model, moe_loss_sums
from moe_lvlm.models.splash import block_size, splash_attention
from tests.models.fast import fast_jit

IMAGE_TOKEN = 3


def close(got, want, rtol=1e-4, atol=1e-8):
    """Every leaf within rtol of the largest |want| of that leaf (fp32 sums reorder); atol for
    leaves whose gradient is zero up to rounding."""
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = max(np.max(np.abs(w)), 1e-30)
        assert np.max(np.abs(g - w)) <= rtol * scale + atol, (np.max(np.abs(g - w)), scale)


def numpy_attention(q, k, v, segment_ids, causal):
    """float64 softmax attention with GQA, packing and causality, written out."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, s, h, d = q.shape
    k, v = (np.repeat(t, h // t.shape[2], axis=2) for t in (k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    allowed = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        allowed = allowed & np.tril(np.ones((s, s), bool))
    logits = np.where(allowed[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("seq,causal", [(256, True), (40, False)])
def test_splash_attention_matches_numpy(seq, causal):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, seq, 4, 32)).astype(np.float32)
    k, v = (rng.normal(size=(2, seq, 2, 32)).astype(np.float32) for _ in range(2))
    segments = np.ones((2, seq), np.int32)
    segments[0, seq // 3 :] = 2  # two packed sequences in row 0
    got = jax.jit(splash_attention, static_argnums=(4,))(q, k, v, segments, causal)
    np.testing.assert_allclose(got, numpy_attention(q, k, v, segments, causal), atol=2e-5)


MESH_CHILD = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from moe_lvlm.models.splash import splash_attention
from moe_lvlm.parallel.mesh import make_mesh
rng = np.random.default_rng(0)
q = rng.normal(size=(4, 128, 4, 16)).astype(np.float32)
k, v = (rng.normal(size=(4, 128, 2, 16)).astype(np.float32) for _ in range(2))
seg = np.ones((4, 128), np.int32)
seg[:, 50:] = 2
want = np.asarray(splash_attention(q, k, v, seg, True))
out = {}
for shape in [(2, 1, 2, 2), (2, 1, 1, 4)]:  # heads over tensor 2; kv heads 2 < tensor 4
    got = jax.jit(lambda *a: splash_attention(*a, True, make_mesh(shape)))(q, k, v, seg)
    out[str(shape)] = float(np.max(np.abs(np.asarray(got) - want)))
print("RESULT " + json.dumps(out))
"""


def test_splash_sharded_over_batch_and_heads_equals_unsharded():
    """On 8 fake devices, inside shard_map: batch over data, heads over tensor (and kv heads
    repeated when the tensor axis exceeds them)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = root
    proc = subprocess.run([sys.executable, "-c", MESH_CHILD], capture_output=True, text=True,
                          timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    diffs = json.loads(line[len("RESULT "):])
    assert set(diffs) == {"(2, 1, 2, 2)", "(2, 1, 1, 4)"}
    assert max(diffs.values()) < 1e-5, diffs


def test_block_size_rule():
    assert [block_size(s) for s in (128, 256, 384, 512, 640, 1024, 2048)] == [
        128, 256, 128, 512, 128, 512, 512
    ]  # fmt: skip


def test_megablox_tiling_rule():
    # tm: min(512, m rounded up to 8); tk, tn: largest of 1024/512/256/128 dividing, else capped
    assert gm.megablox_tiling(8192, 2048, 5632) == (512, 1024, 512)
    assert gm.megablox_tiling(100, 128, 256) == (104, 128, 256)
    assert gm.megablox_tiling(4096, 4096, 14336) == (512, 1024, 1024)
    assert gm.megablox_tiling(64, 64, 200) == (64, 128, 256)  # ragged k, n: the kernel masks
    assert gm.megablox_tiling(1000, 1536, 1000) == (512, 512, 1024)


@pytest.mark.parametrize("sizes", [[50, 60, 50, 40], [50, 0, 90, 40], [0, 30, 0, 10]])
def test_megablox_matches_ragged_dot(sizes):
    """Value and both gradients, with empty groups and rows past the last group."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 64)).astype(np.float32)
    w = rng.normal(size=(4, 64, 96)).astype(np.float32)
    sizes = np.asarray(sizes, np.int32)

    def loss(impl):
        f = lambda x, w: jnp.sum(jnp.sin(gm.grouped_matmul(x, w, sizes, impl)))  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)

    got, want = loss("megablox"), loss("xla")
    close(got, want, 1e-5)
    # Rows past the groups are zero (megablox leaves them unwritten) and get zero gradient.
    used = int(sizes.sum())
    assert np.all(np.asarray(gm.grouped_matmul(x, w, sizes, "megablox"))[used:] == 0)
    assert np.all(np.asarray(got[1][0])[used:] == 0)


def tiny_config(attention: str, gmm: str):
    cfg = models.tiny()
    cfg.decoder.update(vocab_size=128, num_layers=2, moe_layers="every_other")
    cfg.moe.update(dispatch="dropless", grouped_matmul=gmm)
    cfg.update(attention=attention, image_token_id=IMAGE_TOKEN)
    return cfg


def packed_batch(seq: int = 256):
    """Two rows, each packing three conversations (positions restart), trailing padding in row 1."""
    rng = np.random.default_rng(2)
    ids = rng.integers(4, 128, (2, seq)).astype(np.int32)
    segment_ids = np.zeros((2, seq), np.int32)
    positions = np.zeros((2, seq), np.int32)
    for row, bounds in enumerate([(0, 90, 200, seq), (0, 60, 150, 230)]):
        for segment, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            segment_ids[row, a:b] = segment + 1
            positions[row, a:b] = np.arange(b - a)
    ids[segment_ids == 0] = 0
    return ids, positions, segment_ids


@pytest.mark.slow
def test_tiny_model_splash_megablox_equal_xla():
    ids, positions, segment_ids = packed_batch()
    valid = segment_ids > 0
    params = None

    def run(attention, gmm):
        nonlocal params
        model = build_model(tiny_config(attention, gmm))
        if params is None:
            params = model.init(jax.random.key(0), ids, positions, segment_ids)["params"]

        def loss(params):
            logits, metrics = model.apply(
                {"params": params}, ids, positions, segment_ids, train=True, packed=True
            )
            logp = jax.nn.log_softmax(logits[:, :-1])
            nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
            mask = valid[:, 1:] & (segment_ids[:, 1:] == segment_ids[:, :-1])
            balance, z = moe_loss_sums(metrics)
            return jnp.sum(nll * mask) / jnp.sum(mask) + 0.01 * balance + 0.001 * z, logits

        step = fast_jit(jax.value_and_grad(loss, has_aux=True), params)
        (value, logits), grads = step(params)
        return value, np.asarray(logits)[valid], grads

    got, want = run("splash", "megablox"), run("xla", "xla")
    close(got, want)
