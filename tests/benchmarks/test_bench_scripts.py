"""Each benchmark script runs end to end on CPU at a tiny shape (so that it cannot rot)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], env=env,
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_train_step_both_systems(tmp_path):
    out = tmp_path / "rows.json"
    text = run("train_step.py", "--preset", "tiny", "--layers", "2", "--seq", "24", "--batch", "1",
               "--steps", "1", "--warmup", "1", "--dtype", "float32", "--torch", "eager",
               "--variant", "a:remat=none",
               "--json_out", str(out))
    rows = {r["system"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"jax", "torch"}, text
    for r in rows.values():
        assert "error" not in r, r
        assert r["tokens_s"] == pytest.approx(24 / r["median_s"])
        assert r["mfu"] == pytest.approx(r["tflops"] / max(x["ceiling_tflops"]
                                                          for x in rows.values()))
        # Both twins start from small random weights: cross-entropy near ln(vocab) (+ the small
        # balance loss of one MoE layer in ours).
        assert abs(r["loss"] - math.log(1024)) < 0.2, r
    assert rows["jax"]["nonfinite"] == 0
    assert "| jax/a (remat=none) |" in text and "| torch/eager |" in text


def test_step_ab_interleaves_variants():
    """Two variants in their own workers: one MoE layer routed and dense (the same loss)."""
    text = run("step_ab.py", "--shape", "tiny:1:24:2", "--rounds", "2", "--warmup", "1",
               "--variant", "routed:moe.expert_compute=routed", "--variant",
               "dense:moe.expert_compute=dense")
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines()
            if line.startswith("| routed") or line.startswith("| dense")}
    assert set(rows) == {"routed", "dense"}, text
    assert rows["routed"][3].strip() == "1.00x"
    assert float(rows["dense"][4]) == pytest.approx(float(rows["routed"][4]), abs=2e-6)


def test_moe_layer(tmp_path):
    out = tmp_path / "rows.json"
    text = run("moe_layer.py", "--tokens", "64", "--batch", "2", "--d", "32", "--f", "64",
               "--steps", "1", "--modes", "dropless/xla,capacity", "--kernels", "xla",
               "--json_out", str(out))
    result = json.loads(out.read_text())
    assert [r["op"] for r in result["kernels"]] == ["forward", "input grad", "weight grad"]
    assert all(r["rel_err"] < 1e-2 for r in result["kernels"]), result["kernels"]
    modes = [r["mode"] for r in result["layer"]]
    assert modes == ["dropless/xla", "capacity", "2 dense FFNs"], text
    for r in result["layer"]:
        assert "error" not in r and r["ratio"] > 0, r


def test_generation_random_and_workdir(tmp_path):
    from tests.generate.tiny_workdir import make_workdir

    common = ["--text", "4", "--new", "4", "--short", "2", "--repeats", "1"]
    # Image tokens: models.tiny() has 8x8 patches (16 tokens), the demo workdir 16x16 (4).
    for name, batch, image_tokens, extra in (
        ("random", 2, 16, ["--preset", "tiny", "--layers", "2"]),
        ("workdir", 1, 4, ["--workdir", str(make_workdir(tmp_path / "w"))]),
    ):
        out = tmp_path / f"{name}.json"
        run("generation.py", *extra, *common, "--batches", str(batch), "--json_out", str(out))
        rows = json.loads(out.read_text())
        assert [r["batch"] for r in rows] == [batch]
        for r in rows:
            assert r["e2e_tokens_s"] == pytest.approx(r["batch"] * 4 / r["total_s"])
            assert r["prompt"] == image_tokens + 4


def test_kernels_smoke(tmp_path):
    """benchmarks/kernels.py on 4 fake CPU devices: blockwise and native attention, the tiled
    grouped matmul, splash and megablox in interpret mode, the buffered expert-parallel
    dispatch and both ways of the fused LM loss agree with XLA (its own reference column)."""
    out = tmp_path / "rows.json"
    run("kernels.py", "--smoke", "--cpu_devices", "4", "--json_out", str(out))
    rows = json.loads(out.read_text())
    assert [(r["section"], r["impl"]) for r in rows] == [
        ("attention", "xla"), ("attention", "blockwise"), ("attention", "native"),
        ("attention", "splash"),
        ("grouped matmul", "xla"), ("grouped matmul", "tiled"), ("grouped matmul", "megablox"),
        ("dropless dispatch", "all_gather"), ("dropless dispatch", "a2a_buffer"),
        ("lm loss", "xla"), ("lm loss", "native"), ("lm loss", "native_split"),
    ]
    for r in rows:
        assert "error" not in r and r["ms"] > 0 and r["rel_err"] < 1e-4, r
