"""`python -m moe_lvlm.import_checkpoint` on tiny MoE-LLaVA checkpoints, then the other commands on
the workdir it writes: generate (dense StableLM: the original PyTorch model's greedy answer),
evaluate, export (dense StableLM: logits of the HF model equal to the original PyTorch model's,
transformers' tokenizer equal to the run's; MoE StableLM and Phi-2: refused, saying why) and a
continued stage III run. The StableLM checkpoints ship a byte-level BPE tokenizer.json, as the
released ones do, which the import picks up and copies into the workdir; Phi-2's is a SentencePiece
model given with --tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from PIL import Image

from configs import moe_llava
from moe_lvlm.data import tokenizer as tokenizer_lib
from tests.data import bpe_files
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


def _import(tmp_path, backbone, moe_layers, bpe=False):
    """Imports a tiny checkpoint; `bpe`: its own tokenizer.json (fits the 128-row embedding),
    else a SentencePiece model passed with --tokenizer."""
    model = fx.build(backbone, moe_layers)
    fx.save(model, backbone, tmp_path / "ckpt", moe_layers)
    if bpe:
        bpe_files.write_tokenizer_json(tmp_path / "ckpt", vocab_size=120, full_alphabet=False)
        tokenizer = []
    else:
        tiny_tokenizer().save(str(tmp_path / "tok.model"))
        tokenizer = [f"--tokenizer={tmp_path / 'tok.model'}"]
    workdir = tmp_path / "workdir"
    proc = _run(
        "moe_lvlm.import_checkpoint",
        f"--src={tmp_path / 'ckpt'}",
        f"--workdir={workdir}",
        "--config=configs/moe_llava.py",
        *tokenizer,
        f"--vision_config={tmp_path / 'ckpt/clip'}",
        "--config.model.dtype=float32",
        "--config.model.remat=none",
    )
    return model, workdir, proc.stdout


@pytest.mark.slow
def test_moe_import_generate_evaluate_continue(tmp_path):
    _, imported, out = _import(tmp_path, "stablelm", (0,), bpe=True)
    assert "stage3 checkpoint 0" in out
    # The workdir holds its tokenizer and names it relative to itself: it works moved.
    saved = json.loads((imported / "config.json").read_text())["data"]["tokenizer"]
    assert saved == "{workdir}/tokenizer.json"
    workdir = imported.rename(tmp_path / "moved")
    tok = tokenizer_lib.load(str(workdir / "tokenizer.json"))
    ref = tokenizer_lib.load(str(tmp_path / "ckpt"))
    assert tok.encode("How many digits?") == ref.encode("How many digits?")
    assert tok.vocab_size == ref.vocab_size <= fx.SIZES["vocab_size"]
    # (`generate` on an imported workdir: test_dense_import_exports_to_transformers.)
    spec = _llava_data(tmp_path / "data")
    _run("moe_lvlm.evaluate", f"--workdir={workdir}", f"--split={spec}", "--limit=2",
         "--batch_size=2", "--max_new_tokens=3")
    refused = _run("moe_lvlm.export", f"--workdir={workdir}", f"--out={tmp_path / 'hf'}", ok=False)
    error = refused.stderr.splitlines()[-1]  # orbax may warn before it
    assert refused.returncode == 2 and error.startswith("error: ")
    assert "no MoE class for the stablelm" in error and "Traceback" not in refused.stderr
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
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines()[-1] == (  # orbax may warn before it
        "error: decoder.head_bias=True (Phi-2's LM head bias): transformers' "
        "LlavaForConditionalGeneration has an LM head without bias, so no exact HF equivalent "
        "exists; run the model with moe_lvlm.generate / evaluate")


@pytest.mark.slow
def test_dense_import_exports_to_transformers(tmp_path):
    import transformers  # noqa: PLC0415

    model, workdir, out = _import(tmp_path, "stablelm", (), bpe=True)
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

    # The exported tokenizer.json: transformers encodes as the run does, pads on the left.
    ours = tokenizer_lib.load(str(workdir / "tokenizer.json"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = f"{moe_llava.SYSTEM} USER: How many digits? ASSISTANT:"  # MoE-LLaVA's conv_stablelm
    ids = ours.encode(prompt)
    assert hf_tok.encode(prompt) == ids and hf_tok.padding_side == "left"
    assert hf_tok.convert_tokens_to_ids("<image>") == image_id == ours.image_token_id
    assert hf_tok.eos_token_id == ours.eos_id == hf.generation_config.eos_token_id
    # Generation from the CLI with the BPE tokenizer: the original model's greedy answer.
    answer = _run("moe_lvlm.generate", f"--workdir={workdir}", "--prompt=How many digits?",
                  "--max_new_tokens=4").stdout.strip()
    new = []
    for _ in range(4):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1, : ours.vocab_size]
        new.append(int(logits.argmax()))
        if new[-1] == ours.eos_id:
            break
    want = tokenizers.Tokenizer.from_file(str(tmp_path / "ckpt/tokenizer.json"))
    assert answer == want.decode(new, skip_special_tokens=True).strip()


def test_bad_source_is_one_error_line(tmp_path):
    proc = _run("moe_lvlm.import_checkpoint", f"--src={tmp_path / 'none'}",
                f"--workdir={tmp_path / 'w'}", "--config=configs/moe_llava.py",
                f"--tokenizer={tmp_path / 'tok.model'}", ok=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'none' / 'config.json'} not found; point " \
        "at a HF model directory (save_pretrained)"
