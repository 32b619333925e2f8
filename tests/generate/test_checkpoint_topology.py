"""evaluate, generate and export load a checkpoint whatever device set wrote it: a checkpoint that
2 processes x 2 devices wrote (arrays sharded over all 4) loads on 1 device, and a 1-device
checkpoint loads in 2 processes x 2 devices (evaluate) or a 4-device process (generate, export).
Each time the result equals the one from the original checkpoint on 1 device, and the loaded
parameters equal the ones the tiny workdir was made with (numpy)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from launch import local
from moe_lvlm import evaluate, generate
from moe_lvlm.export import export_workdir
from moe_lvlm.interop import hf_import
from moe_lvlm.workdir import load_trained
from tests.generate.tiny_workdir import make_workdir

ROOT = local.REPO_ROOT
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
GEN_ARGS = ["--prompt", "What color is the 3?", "--max_new_tokens=5"]


def flat(params) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """(1-device workdir at step 7, the same parameters saved by 2 processes x 2 devices at 9)."""
    root = tmp_path_factory.mktemp("topology")
    single = make_workdir(root)
    multi = root / "multi"
    multi.mkdir()
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": XLA_FLAGS}
    results = local.run_local("tests.generate.save_sharded", [str(single), str(multi), "9"],
                              num_processes=2, devices_per_process=2, timeout_s=300, env=env,
                              echo=False)
    for r in results:
        assert r.returncode == 0, r.output[-3000:]
    data = multi / "stage3" / "checkpoints" / "9" / "state"
    assert data.is_dir()
    return single, multi


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), np.uint8)).save(path)
    return str(path)


def split(root) -> str:
    rows = [{"id": f"t{i}", "image": "a.png", "answer": a, "question_type": "color",
             "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                               {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate([("What color is the 3?", "red"),
                                        ("Where is the 7?", "top left"),
                                        ("Is there a 5?", "yes")])]
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), (200, 30, 30)).save(root / "a.png")
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"llava:{root / 'test.jsonl'}?image_root={root}"


def answers(out_dir) -> dict:
    return {r["question_id"]: r["prediction"] for r in
            map(json.loads, (out_dir / "per_item.jsonl").read_text().splitlines())}


def test_two_process_checkpoint_on_one_device(workdirs, tmp_path, capsys, image):
    single, multi = workdirs
    want = flat(load_trained(single).params)
    trained = load_trained(multi)
    assert trained.step == 9
    got = flat(trained.params)
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)

    out, _, step = export_workdir(multi, tmp_path / "hf")
    assert step == 9
    imported = flat(hf_import.import_llava(out)[1])
    for key in ("decoder/embedding", "decoder/layers_0/moe/experts/gate"):
        np.testing.assert_array_equal(imported[key], want[key], err_msg=key)

    said = []
    for workdir in (single, multi):
        generate.main(["--workdir", str(workdir), "--image", image, *GEN_ARGS])
        said.append(capsys.readouterr().out)
    assert said[0] == said[1] and said[0].strip()

    spec = split(tmp_path / "data")
    scored = [evaluate.main(["--workdir", str(w), f"--split={spec}", "--max_new_tokens=4",
                             f"--out_dir={tmp_path / w.name}"]) for w in (single, multi)]
    capsys.readouterr()
    assert scored[1]["step"] == 9 and scored[1]["num_questions"] == 3
    assert answers(tmp_path / single.name) == answers(tmp_path / multi.name)


@pytest.mark.slow
def test_one_device_checkpoint_on_four_devices(workdirs, tmp_path, image):
    single, _ = workdirs
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": XLA_FLAGS}
    spec = split(tmp_path / "data")
    out = {}
    for name, processes, devices in (("one", 1, 1), ("pod", 2, 2)):
        results = local.run_local(
            "moe_lvlm.evaluate", ["--workdir", str(single), f"--split={spec}",
                                  "--max_new_tokens=4", f"--out_dir={tmp_path / name}"],
            num_processes=processes, devices_per_process=devices, timeout_s=300, env=env,
            echo=False)
        for r in results:
            assert r.returncode == 0, r.output[-3000:]
        out[name] = answers(tmp_path / name)
    assert (tmp_path / "pod" / "answers.1.jsonl").exists()  # both processes answered
    assert out["pod"] == out["one"]

    four = {**env, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}
    said = subprocess.run(
        [sys.executable, "-m", "moe_lvlm.generate", "--workdir", str(single), "--image", image,
         *GEN_ARGS], cwd=ROOT, env=four, capture_output=True, text=True, timeout=300)
    assert said.returncode == 0, said.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "moe_lvlm.generate", "--workdir", str(single), "--image", image,
         *GEN_ARGS], cwd=ROOT, env={**four, "JAX_NUM_CPU_DEVICES": "1"}, capture_output=True,
        text=True, timeout=300)
    assert said.stdout == one.stdout and said.stdout.strip()
    exported = subprocess.run(
        [sys.executable, "-m", "moe_lvlm.export", f"--workdir={single}",
         f"--out={tmp_path / 'hf'}"], cwd=ROOT, env=four, capture_output=True, text=True,
        timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    want = flat(load_trained(single).params)
    imported = flat(hf_import.import_llava(tmp_path / "hf")[1])
    for key in ("decoder/embedding", "decoder/layers_0/moe/experts/gate"):
        np.testing.assert_array_equal(imported[key], want[key], err_msg=key)
