"""Helpers shared by the benchmark scripts: model configs, timing, the matmul ceiling, workers
in subprocesses, per-op GPU profiles and tables.

Each measurement runs in its own Python process (`run_worker`), so that XLA flags, the JAX
config and device memory of one variant cannot leak into the next and a crash costs one row.
"""

import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from configs import models

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH_RESULT "


def model_config(preset: str, layers: int = 0, dtype: str = "bfloat16"
                 ) -> ml_collections.ConfigDict:
    """The benchmark model: a preset with qk-norm (so that its exact HF twin is qwen3_moe, the
    peer of the GPU issue), `dtype` compute over fp32 parameters, `layers` decoder layers if
    > 0."""
    cfg = models.get(preset)
    cfg.decoder.qk_norm = True
    if layers:
        cfg.decoder.num_layers = layers
    cfg.image_token_id = cfg.decoder.vocab_size - 1
    cfg.dtype = dtype
    cfg.param_dtype = "float32"
    return cfg


# Grouped-matmul choices of the dropless MoE: (implementation in
# moe_lvlm/models/grouped_matmul.py, XLA options, whether to turn on JAX's Pallas-Triton
# lowering of jax.lax.ragged_dot). XLA's default GPU lowering of ragged_dot is a masked dense
# expansion (every row against every expert); 'xla-cudnn' asks XLA for cuDNN's grouped matmul.
GMM_CHOICES = {
    "auto": ("auto", {}, False),
    "tiled": ("tiled", {}, False),
    "xla": ("xla", {}, False),
    "xla-cudnn": ("xla", {"xla_gpu_experimental_use_ragged_dot_fusion": True}, False),
    "triton": ("xla", {}, True),
    "mosaic": ("mosaic", {}, False),
    "megablox": ("megablox", {}, False),  # TPU (Pallas interpret mode elsewhere)
}


def gmm_choice(name: str) -> tuple[str, dict, bool]:
    if name not in GMM_CHOICES:
        raise ValueError(f"unknown grouped matmul {name!r}; choose one of {sorted(GMM_CHOICES)}")
    implementation, options, triton = GMM_CHOICES[name]
    if triton:
        import jax

        jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", True)
    return implementation, options, triton


def custom_calls(hlo_text: str) -> str:
    """'target x count' of the custom calls in compiled HLO: which kernels (cuDNN attention,
    cuBLAS, Triton, Mosaic) a variant really uses."""
    counts: dict[str, int] = {}
    for target in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
        counts[target] = counts.get(target, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def median_seconds(fn: Callable[[], Any], steps: int, sync: Callable[[Any], Any]) -> list[float]:
    """Wall time of `steps` calls of fn, each synchronised with `sync(result)`."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def jax_matmul_ceiling(size: int, steps: int = 10) -> float:
    """TFLOP/s of a bf16 [size, size] x [size, size] matmul on the default JAX device."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (size, size), jnp.bfloat16)
    b = jax.random.normal(kb, (size, size), jnp.bfloat16)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    times = median_seconds(lambda: mm(a, b), steps, lambda r: r.block_until_ready())
    return 2 * size**3 / statistics.median(times) / 1e12


def jax_peak_memory_gb() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 1e9 if stats and "peak_bytes_in_use" in stats else None


def gpu_op_profile(fn: Callable[[], Any], top: int = 25) -> list[dict[str, Any]]:
    """Per-op device time of one call of fn (traced with jax.profiler): the `top` XLA ops by
    total time, with count and share. Empty on a platform without a device op timeline."""
    from jax.profiler import ProfileData, trace

    directory = tempfile.mkdtemp(prefix="bench_profile_")
    with trace(directory):
        fn()
    paths = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    if not paths:
        return []
    totals: dict[str, list[float]] = {}
    for plane in ProfileData.from_file(paths[0]).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        lines = list(plane.lines)
        ops = [line for line in lines if line.name == "XLA Ops"] or [
            line for line in lines if line.name.startswith("Stream")
        ]
        for line in ops:
            for event in line.events:
                entry = totals.setdefault(event.name, [0.0, 0])
                entry[0] += event.duration_ns / 1e6
                entry[1] += 1
    if not totals:
        return []
    grand = sum(ms for ms, _ in totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [
        {"op": name, "ms": round(ms, 3), "count": n, "share": round(ms / grand, 4)}
        for name, (ms, n) in ranked
    ] + [{"op": "TOTAL", "ms": round(grand, 3), "count": 0, "share": 1.0}]


def run_worker(
    script: str, argv: Sequence[str], spec: dict, extra_env: dict[str, str], timeout: float
) -> dict:
    """Runs `python script ARGV --worker SPEC_JSON`; returns its result dict (or the error)."""
    env = {**os.environ, **extra_env, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, script, *argv, "--worker", json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {**spec, "error": f"timed out after {timeout:.0f} s", "log": _tail(e.stderr)}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            result["worker_s"] = round(time.perf_counter() - start, 1)
            return result
    return {**spec, "error": f"worker exited with {proc.returncode}",
            "log": _tail(proc.stderr) + _tail(proc.stdout)}


def _tail(text: str | bytes | None, lines: int = 15) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def emit_result(result: dict) -> None:
    """What a worker prints last: one line its parent parses."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table; columns are (header, key, format), missing values shown as '-'."""
    out = ["| " + " | ".join(h for h, _, _ in columns) + " |",
           "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------- step inputs
def batch_arrays(cfg, batch: int, seq: int, seed: int = 0) -> dict:
    """numpy arrays of one training batch: 1 image per row, its placeholders first."""
    import numpy as np

    from moe_lvlm.config import num_image_tokens

    n_img = num_image_tokens(cfg)
    if seq <= n_img:
        raise SystemExit(f"--seq {seq} must exceed the {n_img} image tokens")
    rng = np.random.default_rng(seed)
    vocab = cfg.decoder.vocab_size
    ids = rng.integers(1, vocab - 1, (batch, seq), dtype=np.int64).astype(np.int32)
    ids[:, :n_img] = cfg.image_token_id
    targets = np.concatenate([ids[:, 1:], rng.integers(1, vocab - 1, (batch, 1))], 1)
    loss_mask = np.ones((batch, seq), np.float32)
    loss_mask[:, : n_img - 1] = 0.0
    size = cfg.vision.image_size
    images = rng.standard_normal((batch, 1, size, size, 3)).astype(np.float32)
    return {
        "input_ids": ids,
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "segment_ids": np.ones((batch, seq), np.int32),
        "targets": targets.astype(np.int32),
        "loss_mask": loss_mask,
        "images": images,
    }


def init_params(model, cfg, rng):
    """Parameters of the model's shapes without running it: norm scales 1, biases 0, other
    weights N(0, 0.02)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    size = cfg.vision.image_size
    dummy = (jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32),
             jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 1, size, size, 3), jnp.float32))
    shapes = nn.meta.unbox(jax.eval_shape(lambda r: model.init(r, *dummy)["params"], rng))
    flat = traverse_util.flatten_dict(shapes, sep="/")

    def fill(key):
        out = {}
        for i, (path, s) in enumerate(sorted(flat.items())):
            if path.endswith("scale"):
                out[path] = jnp.ones(s.shape, s.dtype)
            elif path.endswith("bias"):
                out[path] = jnp.zeros(s.shape, s.dtype)
            else:
                out[path] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype)
        return traverse_util.unflatten_dict(out, sep="/")

    return jax.jit(fill)(rng)


# --------------------------------------------------------------------------- CPU profile
# Where an XLA op's time goes, by the model part named in its source path (first match wins);
# ops outside the model (no 'LVLM' in the path) are the loss, gradient clipping and AdamW.
CPU_PARTS = (
    ("attention: q/k/v/o projections", r"/attn/(attn\._proj/)?(q|k|v|o)/"),
    ("attention: scores, softmax, PV", r"/attn/"),
    ("MoE: router", r"/moe/.*(router|softmax|argmax|one_hot|top_k|log)"),
    ("MoE: dispatch, experts, combine", r"/moe/"),
    ("dense FFN", r"/mlp/"),
    ("vision tower + projector", r"/(vision|projector)/"),
    ("norms", r"norm"),
    ("embedding, LM head", r"(embedding|lm_head|decoder/dot_general|decoder/einsum|take)"),
    ("other model ops", r"LVLM"),
    ("loss (log-softmax, CE)", r"(log_softmax|cross_entropy|take_along_axis)"),
    ("optimizer (clip, AdamW, finite check)", r""),
)


def cpu_op_profile(fn: Callable[[], Any], hlo_text: str, top: int = 12) -> list[dict[str, Any]]:
    """Wall time of one call of fn on CPU (jax.profiler trace) by model part (CPU_PARTS), the
    forward and backward (transposed) shares of each, then the `top` single ops."""
    from jax.profiler import ProfileData, trace

    names = dict(re.findall(r'%([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]+)"', hlo_text))
    directory = tempfile.mkdtemp(prefix="bench_profile_")
    with trace(directory):
        fn()
    paths = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    ops: dict[str, float] = {}
    for plane in ProfileData.from_file(paths[0]).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in names:
                    ops[event.name] = ops.get(event.name, 0.0) + event.duration_ns / 1e6
    grand = sum(ops.values()) or 1.0
    parts: dict[str, list[float]] = {name: [0.0, 0.0] for name, _ in CPU_PARTS}
    for op, ms in ops.items():
        path = names[op]
        part = next(name for name, pattern in CPU_PARTS if re.search(pattern, path))
        parts[part][1 if "transpose(" in path else 0] += ms
    rows = [{"op": f"{name} (fwd / bwd ms: {fwd:.1f} / {bwd:.1f})", "ms": round(fwd + bwd, 2),
             "share": round((fwd + bwd) / grand, 4)} for name, (fwd, bwd) in parts.items()]
    rows.sort(key=lambda r: -r["ms"])
    ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
    rows += [{"op": f"op {op}: {names[op][:90]}", "ms": round(ms, 2), "share": round(ms / grand, 4)}
             for op, ms in ranked]
    return rows + [{"op": "TOTAL (sum of op times)", "ms": round(grand, 2), "share": 1.0}]
