"""Shared fixtures for the training tests.

- `data_dir`: the built-in dataset, built once per session.
- `compile_cache`: a persistent XLA compilation cache shared by this process and the training
  subprocesses, so that the same train step is compiled once per session.
- `reference_run`: one uninterrupted `python -m moe_lvlm.train` run of all three stages of the
  demo recipe on a shrunk model (REFERENCE_OVERRIDES), logging every step and tracing step 2;
  several tests compare against it or read its outputs.
"""

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import demo
from moe_lvlm.data import builtin

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
# The demo recipe cut down: 2-block decoder (block 0 MoE), 2-block ViT, short rows (shorter in
# stage III), batch 4.
REFERENCE_ARG = "dispatch=capacity"
REFERENCE_OVERRIDES = {
    "model.decoder.num_layers": 2,
    "model.vision.depth": 2,
    "data.seq_len": 96,
    "stage3.seq_len": 64,
    "vision_pretrain.steps": 2,
    "log_every": 1,
    "checkpoint.every": 2,
    "profile.num_steps": 1,  # a jax.profiler trace of step 2 of every stage (test_profile.py)
    **{f"stage{i}.num_steps": STEPS for i in (1, 2, 3)},
    **{f"stage{i}.batch_size": 4 for i in (1, 2, 3)},
}
# Subprocesses: every compilation cached, and cheaper CPU code generation (compiling dominates).
SUBPROCESS_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """The built-in dataset with fewer records per split (a few seconds to build)."""
    path = str(tmp_path_factory.mktemp("tfds"))
    with mock.patch.dict(builtin.SPLIT_SIZES, stage1=400, stage2=400, stage3=400, test=100):
        builtin.ensure_built(path)
    return path


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """Turns the persistent compilation cache on in this process (and returns its directory for
    subprocesses); restores the previous settings at the end of the session."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    for name, value in zip(names, (path, 0.0, 0), strict=True):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield path
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def config_args(arg: str, overrides: dict) -> list[str]:
    """Command-line flags for `python -m moe_lvlm.train` with the demo config."""
    return [f"--config=configs/demo.py:{arg}" if arg else "--config=configs/demo.py"] + [
        f"--config.{k}={v}" for k, v in overrides.items()
    ]


def demo_config(arg: str, overrides: dict) -> ml_collections.ConfigDict:
    """The same config built in this process."""
    cfg = demo.get_config(arg)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        section = cfg
        for p in parents:
            section = section[p]
        section[leaf] = value
    return cfg


def train_env(cache_dir: str, xla_flags: str = "") -> dict[str, str]:
    """This environment with SUBPROCESS_ENV, the compilation cache and `xla_flags` added."""
    env = {**os.environ, **SUBPROCESS_ENV, "JAX_COMPILATION_CACHE_DIR": cache_dir}
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {xla_flags}".strip()
    return env


def train_command(workdir: Path, data_dir: str, arg: str, overrides: dict,
                  config: str = "configs/demo.py") -> list[str]:
    args = config_args(arg, {**overrides, "data.data_dir": data_dir})
    args[0] = args[0].replace("configs/demo.py", config)
    return [sys.executable, "-m", "moe_lvlm.train", f"--workdir={workdir}", *args]


def run_train(command: list[str], cache_dir: str, timeout: int = 600) -> str:
    """Runs a training command to the end; returns its stdout (fails the test on errors)."""
    result = subprocess.run(command, cwd=ROOT, env=train_env(cache_dir), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, data_dir, compile_cache) -> Path:
    """Workdir of the uninterrupted reference run (its stdout is in `stdout.txt`)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    command = train_command(workdir, data_dir, REFERENCE_ARG, REFERENCE_OVERRIDES)
    (workdir.parent / "stdout.txt").write_text(run_train(command, compile_cache))
    return workdir


def restore_state(directory: Path, step: int) -> dict:
    """A checkpoint's train state as numpy arrays, read without any target shapes."""
    with ocp.CheckpointManager(Path(directory).absolute()) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
    return jax.tree.map(np.asarray, restored["state"])


def checkpoint_steps(directory: Path) -> list[int]:
    return sorted(ocp.utils.checkpoint_steps(Path(directory).absolute()))
