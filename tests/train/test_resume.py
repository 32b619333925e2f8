"""Exact resume: a run killed with SIGKILL and restarted with the same command logs the same
per-step losses, bit for bit, as the uninterrupted reference run, across a stage boundary; a
checkpoint save cut short by the kill does not keep it from resuming."""

import json
import os
import signal
import subprocess
import time

from tests.train.conftest import (
    REFERENCE_ARG,
    REFERENCE_OVERRIDES,
    ROOT,
    STEPS,
    run_train,
    train_command,
    train_env,
)

COMPARED = ("loss", "ce", "grad_norm", "lr", "balance_loss", "z_loss", "nonfinite")


def records(workdir, stage):
    path = workdir / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(workdir, stage, step, proc, log, timeout=500):
    start = time.monotonic()
    while not any(r["step"] >= step for r in records(workdir, stage)):
        assert proc.poll() is None, f"training exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() - start < timeout, f"no {stage} step {step} after {timeout}s"
        time.sleep(0.02)


def assert_same(got, want, where):
    assert got["step"] == want["step"], where
    for key in COMPARED:
        assert got[key] == want[key], f"{where} step {got['step']} {key}: {got[key]} != {want[key]}"


def test_killed_run_resumes_bit_for_bit(tmp_path, data_dir, compile_cache, reference_run):
    workdir = tmp_path / "run"
    # A save every step: the kill most likely lands while one is being written.
    command = train_command(workdir, data_dir, REFERENCE_ARG,
                            {**REFERENCE_OVERRIDES, "checkpoint.every": 1})
    log = tmp_path / "killed.log"
    with log.open("w") as f:
        proc = subprocess.Popen(command, cwd=ROOT, env=train_env(compile_cache), stdout=f,
                                stderr=subprocess.STDOUT)
        try:
            wait_for_step(workdir, "stage2", 3, proc, log)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    before_restart = records(workdir, "stage2")
    checkpoints = workdir / "stage2" / "checkpoints"
    # What a save killed half-way leaves: orbax's temporary directory of that step.
    partial = checkpoints / f"{STEPS}.orbax-checkpoint-tmp-1700000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text('{"tree_metadata": ')

    out = run_train(command, compile_cache)

    assert "stage1: already complete" in out
    assert "stage2: resuming from checkpoint" in out
    assert not partial.exists()
    reference = {s: records(reference_run, s) for s in ("stage1", "stage2", "stage3")}
    for r in before_restart:
        assert_same(r, reference["stage2"][r["step"] - 1], "stage2 before the kill")
    for stage, want in reference.items():
        got = records(workdir, stage)
        assert [r["step"] for r in got] == list(range(1, STEPS + 1)), stage
        for g, w in zip(got, want, strict=True):
            assert_same(g, w, stage)
