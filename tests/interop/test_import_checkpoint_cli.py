"""`python -m moe_lvlm.import_checkpoint` on tiny MoE-LLaVA checkpoints, then the other commands on
the workdir it writes: generate, evaluate, export (dense StableLM: logits of the HF model equal to
the original PyTorch model's; MoE StableLM and Phi-2: refused, saying why) and a continued stage
III run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.generate.tiny_workdir import tiny_tokenizer
from tests.interop import moe_llava_fixtures as fx
from tests.interop.hf_helpers import TOL, max_err, torch

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
}


def _run(*args, ok=True):
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _llava_data(root: Path) -> str:
    """Four LLaVA-format records with 16px images: the spec of a `llava:` source."""
    root.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
        records.append(
            dict(
                id=str(i),
                image=f"{i}.png",
                answer=f"item {i}",
                conversations=[
                    dict(value="<image>\nHow many digits are in the image?", **{"from": "human"}),
                    dict(value=f"item {i}", **{"from": "gpt"}),
                ],
            )
        )
    (root / "data.json").write_text(json.dumps(records))
    return f"llava:{root / 'data.json'}?image_root={root}"


def _import(tmp_path, backbone, moe_layers):
    model = fx.build(backbone, moe_layers)
    fx.save(model, backbone, tmp_path / "ckpt", moe_layers)
    tiny_tokenizer().save(str(tmp_path / "tok.model"))
    workdir = tmp_path / "workdir"
    proc = _run(
        "moe_lvlm.import_checkpoint",
        f"--src={tmp_path / 'ckpt'}",
        f"--workdir={workdir}",
        "--config=configs/moe_llava.py",
        f"--tokenizer={tmp_path / 'tok.model'}",
        f"--vision_config={tmp_path / 'ckpt/clip'}",
        "--config.model.dtype=float32",
        "--config.model.remat=none",
    )
    return model, workdir, proc.stdout


@pytest.mark.slow
def test_moe_import_generate_evaluate_continue(tmp_path):
    _, workdir, out = _import(tmp_path, "stablelm", (0,))
    assert "stage3 checkpoint 0" in out
    _run(
        "moe_lvlm.generate",
        f"--workdir={workdir}",
        "--prompt=How many digits?",
        "--max_new_tokens=3",
    )
    spec = _llava_data(tmp_path / "data")
    _run("moe_lvlm.evaluate", f"--workdir={workdir}", f"--split={spec}", "--limit=2",
         "--batch_size=2", "--max_new_tokens=3")
    refused = _run("moe_lvlm.export", f"--workdir={workdir}", f"--out={tmp_path / 'hf'}", ok=False)
    assert refused.returncode != 0 and "no MoE class for the stablelm" in refused.stderr
    _run(
        "moe_lvlm.train",
        f"--config=configs/workdir.py:{workdir}",
        f"--workdir={workdir}",
        f"--config.data.mixture={spec}",
        "--config.stage3.num_steps=2",
        "--config.stage3.batch_size=2",
        "--config.stage3.seq_len=128",
        "--config.data.seq_len=128",
        "--config.data.system_prompt=",
        "--config.checkpoint.async_save=False",
    )
    steps = sorted(
        int(p.name) for p in (workdir / "stage3/checkpoints").iterdir() if p.name.isdigit()
    )
    assert steps[-1] == 2
    metrics = [json.loads(x) for x in (workdir / "stage3/metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[0]["step"] >= 1


@pytest.mark.slow
def test_phi_export_refused(tmp_path):
    _, workdir, _ = _import(tmp_path, "phi", ())
    refused = _run("moe_lvlm.export", f"--workdir={workdir}", f"--out={tmp_path / 'hf'}", ok=False)
    assert "LM head without bias" in refused.stderr


@pytest.mark.slow
def test_dense_import_exports_to_transformers(tmp_path):
    import transformers  # noqa: PLC0415

    model, workdir, out = _import(tmp_path, "stablelm", ())
    assert "stage2 checkpoint" in out
    _run("moe_lvlm.export", f"--workdir={workdir}", f"--out={tmp_path / 'hf'}", "--dtype=float32")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    rng = np.random.RandomState(0)
    image_id = hf.config.image_token_index
    ids = rng.randint(8, 64, (1, 10))
    ids[:, 2:6] = image_id
    pixels = rng.randn(1, 3, 16, 16).astype(np.float32)
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    ids_ref = ids.copy()
    ids_ref[ids == image_id] = fx.IMAGE_TOKEN_ID
    assert max_err(got, fx.forward(model, ids_ref, pixels)) <= TOL


def test_bad_source_is_one_error_line(tmp_path):
    proc = _run("moe_lvlm.import_checkpoint", f"--src={tmp_path / 'none'}",
                f"--workdir={tmp_path / 'w'}", "--config=configs/moe_llava.py",
                f"--tokenizer={tmp_path / 'tok.model'}", ok=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'none' / 'config.json'} not found; point " \
        "at a HF model directory (save_pretrained)"
