"""The pod path end to end against a GCS API server on localhost (the `gcs` fixture):

`launch/local.py` runs 2 processes x 2 devices training MoE-tuning stage III of the demo recipe
(shrunk) with the workdir and the TFDS data_dir in gs://; a SIGTERM to the launcher makes both
processes save a checkpoint of the same step and exit with EXIT_PREEMPTED, and so does the
launcher. One process on one device resumes from that checkpoint and finishes the stage; every
step is logged once. `python -m moe_lvlm.export --workdir=gs://...` writes a directory that
transformers loads and that holds the checkpoint's parameters. No local `gs:` folder appears.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import traverse_util

from moe_lvlm import paths
from moe_lvlm.exit_codes import EXIT_PREEMPTED
from moe_lvlm.train.checkpoint import restore_params
from tests.train.conftest import (
    REFERENCE_ARG,
    REFERENCE_OVERRIDES,
    ROOT,
    run_train,
    train_command,
    train_env,
)

STEPS = 60
OVERRIDES = {**REFERENCE_OVERRIDES, "stages": "stage3", "stage3.init_from": "none",
             "stage3.num_steps": STEPS,
             "checkpoint.every": 1000}


def metrics(workdir: str) -> list[dict]:
    path = paths.path(workdir) / "stage3" / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines()]
    except FileNotFoundError:  # replaced while read
        return []


def local_gs_folders() -> list[str]:
    return [str(p) for p in (ROOT, ROOT / "launch") if (p / "gs:").exists()]


@pytest.mark.slow
def test_preempted_pod_run_resumes_on_one_process_and_exports(
        tmp_path, gcs, data_dir, compile_cache):
    remote_data = f"{gcs}/tfds"
    paths.upload(data_dir, remote_data)
    workdir = f"{gcs}/pod_run"
    command = train_command(workdir, remote_data, REFERENCE_ARG, OVERRIDES)
    launcher = [sys.executable, "launch/local.py", "--num-processes=2",
                "--devices-per-process=2", "moe_lvlm.train", *command[3:]]
    log = tmp_path / "preempted.log"
    env = {**train_env(compile_cache), "PYTHONPATH": str(ROOT)}
    with log.open("w") as f:
        proc = subprocess.Popen(launcher, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            start = time.monotonic()
            while not any(r["step"] >= 2 for r in metrics(workdir)):
                assert proc.poll() is None, f"exited early:\n{log.read_text()[-4000:]}"
                assert time.monotonic() - start < 600, "no stage3 step 2 after 600 s"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=300) == EXIT_PREEMPTED, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log.read_text()
    saved = {int(p): int(s) for p, s in
             re.findall(r"\[p(\d)\] stage3: preempted, checkpoint (\d+) saved", out)}
    assert sorted(saved) == [0, 1] and len(set(saved.values())) == 1, out[-4000:]
    step = saved[0]
    assert 2 <= step < STEPS
    for i in (0, 1):
        assert f"process {i} exited with {EXIT_PREEMPTED}" in out
    data = paths.path(workdir) / "stage3" / "checkpoints" / str(step) / "data"
    assert sorted(p.name for p in data.glob("process_*")) == ["process_0-of-2.json",
                                                              "process_1-of-2.json"]

    resumed = run_train(command, compile_cache)  # 1 process, 1 device
    assert (f"stage3: checkpoint {step} holds no data position for 1 process(es) (saved by "
            f"another process count, or imported): data from record "
            f"{step * OVERRIDES['stage3.batch_size']}") in resumed
    assert f"stage3: resuming from checkpoint {step}" in resumed
    records = metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) for r in records)

    hf = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "moe_lvlm.export", f"--workdir={workdir}", f"--out={hf}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"stage3 step {STEPS}" in result.stdout
    import transformers

    from moe_lvlm.interop import hf_import

    model = transformers.LlavaForConditionalGeneration.from_pretrained(hf)
    assert model.config.text_config.model_type in ("qwen2_moe", "qwen3_moe", "mixtral")
    _, imported = hf_import.import_llava(hf)
    want = traverse_util.flatten_dict(
        restore_params(paths.path(workdir) / "stage3" / "checkpoints", STEPS), sep="/")
    got = traverse_util.flatten_dict(imported, sep="/")
    for key in ("decoder/embedding", "decoder/layers_0/moe/experts/gate"):
        np.testing.assert_array_equal(got[key], np.asarray(want[key]), err_msg=key)
    assert not local_gs_folders()
    assert not [d for d, _, _ in os.walk(tmp_path.parent) if os.path.basename(d) == "gs:"]
