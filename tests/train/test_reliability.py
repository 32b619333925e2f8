"""docs/reliability.md, training rows: user mistakes end fast with one line `error: ...` and exit
code 2 before any work; a corrupt checkpoint is moved aside and the previous one used; a restart
can change steps and data (with a warning) but not the model, and never rewrites config.json
before the new config is accepted. Every subprocess has a timeout, so a hang fails fast."""

import json
import shutil
import subprocess

import jax
import numpy as np
import pytest

from configs import demo
from moe_lvlm import config as config_lib
from moe_lvlm.train.checkpoint import CORRUPT_DIR, StageCheckpoints
from moe_lvlm.workdir import load_trained
from tests.train.conftest import (
    REFERENCE_ARG,
    REFERENCE_OVERRIDES,
    ROOT,
    STEPS,
    checkpoint_steps,
    restore_state,
    train_command,
    train_env,
)

TIMEOUT = 240


def run_cli(command, cache_dir, env=None):
    return subprocess.run(command, cwd=ROOT, env={**train_env(cache_dir), **(env or {})},
                          capture_output=True, text=True, timeout=TIMEOUT)


def error_line(result) -> str:
    """The single line a user error prints (stderr holds nothing else but absl/orbax noise)."""
    lines = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------- config mistakes (CLI)

CLI_MISTAKES = {
    "unknown_key": (["--config.model.decoder.num_layer=3"],
                    "unknown config key 'model.decoder.num_layer'", "did you mean 'num_layers'"),
    "batch_size_0": (["--config.stage1.batch_size=0"], "stage1.batch_size=0", ">= 1"),
    "demo_mixture": (["--config.data.mixture=llava:/nonexistent.json"],
                     "data.mixture='llava:/nonexistent.json' would be ignored", "stage1.mixture"),
    "nan_policy_typo": (["--config.nan_policy=stp"], "nan_policy='stp'", "('skip', 'stop')"),
}


@pytest.mark.parametrize("case", sorted(CLI_MISTAKES))
def test_config_mistake_is_one_line_before_any_work(case, tmp_path, data_dir, compile_cache):
    flags, *expected = CLI_MISTAKES[case]
    workdir = tmp_path / "run"
    command = train_command(workdir, data_dir, REFERENCE_ARG, REFERENCE_OVERRIDES) + flags
    result = run_cli(command, compile_cache)
    assert result.returncode == 2, result.stderr[-3000:]
    line = error_line(result)
    for text in expected:
        assert text in line
    assert not workdir.exists()  # no config.json, no vision pre-training


def test_debug_shows_the_traceback(tmp_path, data_dir, compile_cache):
    command = train_command(tmp_path / "run", data_dir, REFERENCE_ARG, REFERENCE_OVERRIDES)
    result = run_cli(command + ["--config.stage2.lr=-1e-3"], compile_cache,
                     env={"MOE_LVLM_DEBUG": "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ConfigError: stage2.lr=-0.001" in result.stderr


def test_every_record_skipped_ends_training_with_one_line(tmp_path, data_dir, compile_cache):
    """A wrong image_root: the run stops at its first batch instead of spinning."""
    data = tmp_path / "data.json"
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]
    data.write_text(json.dumps([{"id": f"rec{i}", "image": "a.png", "conversations": conv}
                                for i in range(3)]))
    overrides = {**REFERENCE_OVERRIDES, "stages": "stage1", "vision_pretrain.steps": 0,
                 "stage1.mixture": f"llava:{data}?image_root={tmp_path}",
                 "data.max_consecutive_skips": 100}
    workdir = tmp_path / "run"
    result = run_cli(train_command(workdir, data_dir, REFERENCE_ARG, overrides), compile_cache)
    assert result.returncode == 2, result.stderr[-3000:]
    line = error_line(result)
    assert line.startswith(f"error: 100 records in a row were skipped and none was usable "
                           f"(source: {data}); skipped by reason: {{'missing_image': 100}}")
    assert checkpoint_steps(workdir / "stage1" / "checkpoints") == []


# ----------------------------------------------------------------------- validation (in process)


def _demo(**overrides):
    cfg = demo.get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        section = cfg
        for p in parents:
            section = section[p]
        section[leaf] = value
    return cfg


@pytest.mark.parametrize("overrides, message", [
    ({"stage2.lr": -1e-3}, "stage2.lr=-0.001 is not allowed: it must be a positive number"),
    ({"stage3.lr": float("nan")}, "stage3.lr=nan"),
    ({"stage1.batch_size": 0}, "stage1.batch_size=0 is not allowed: it must be >= 1"),
    ({"stage2.grad_accum": 3}, "stage2.batch_size=32 is not allowed: it must be divisible by"),
    ({"data.seq_len": 12}, "data.seq_len=12 is not allowed: a row must hold the 4 image tokens"),
    ({"stage3.seq_len": 19}, "stage3.seq_len=19"),
    ({"nan_policy": "Stop"}, "nan_policy='Stop'"),
    ({"data.bad_records": "skp"}, "data.bad_records='skp' is not allowed: use one of ('skip', "),
    ({"data.template": "vicuna"}, "data.template='vicuna'"),
    ({"model.moe.dispatch": "drop"}, "model.moe.dispatch='drop' is unknown"),
    ({"stages": "stage1,stage4"}, "'stage4' is not a stage section"),
    ({"stage3.init_from": "stage9"}, "stage3.init_from='stage9'"),
    ({"stage1.mixture": "llava:/nonexistent/x.json"}, "file /nonexistent/x.json does not exist"),
    ({"stage1.mixture": "builtin:stage1@-1"}, "weights must be positive"),
    ({"data.tokenizer": "/nonexistent/sp.model"}, "data.tokenizer='/nonexistent/sp.model'"),
    ({"data.max_consecutive_skips": 0}, "data.max_consecutive_skips=0"),
    ({"checkpoint.every": 0}, "checkpoint.every=0"),
])  # fmt: skip
def test_validate_names_field_value_and_what_is_allowed(overrides, message):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(_demo(**overrides), 1)
    assert message in str(e.value)


def test_demo_mixture_override_is_honoured_for_a_stage_that_reads_it(tmp_path):
    data = tmp_path / "d.json"
    data.write_text("[]")
    cfg = _demo(**{"data.mixture": f"llava:{data}", "stage1.mixture": ""})
    config_lib.validate(cfg, 1, overrides={"data.mixture": cfg.data.mixture})  # stage1 reads it
    assert config_lib.validate(demo.get_config(), 1) == (1, 1, 1, 1)


# ----------------------------------------------------------------------- corrupt checkpoints


def _state():
    return {"params": {"w": jax.numpy.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 7},
            "step": jax.numpy.zeros((), jax.numpy.int32)}


def _corrupt(step_dir, how):
    """Damages a checkpoint's state. Every OCDBT data file is damaged, not one: which file holds
    the params (all that `load_trained` reads) differs from save to save."""
    files = sorted(p for p in (step_dir / "state").rglob("*") if p.is_file())
    data_files = [p for p in files if p.parent.name == "d"]
    assert data_files, f"no data files under {step_dir}"
    if how == "truncated":
        for data in data_files:
            data.write_bytes(data.read_bytes()[:min(100, data.stat().st_size // 2)])
    elif how == "zeroed":
        for data in data_files:
            data.write_bytes(b"\0" * data.stat().st_size)
    elif how == "no_manifest":
        for p in files:
            if p.name == "manifest.ocdbt":
                p.unlink()
    elif how == "no_state":
        shutil.rmtree(step_dir / "state")


@pytest.mark.parametrize("how", ["truncated", "zeroed", "no_manifest", "no_state"])
def test_corrupt_newest_checkpoint_is_moved_aside(tmp_path, capsys, how):
    directory = tmp_path / "stage1" / "checkpoints"
    ckpt = StageCheckpoints(directory, max_to_keep=3, async_save=False)
    state = _state()
    ckpt.save(1, state, None, demo.get_config())
    ckpt.save(2, jax.tree.map(lambda x: x + 1, state), None, demo.get_config())
    _corrupt(directory / "2", how)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    step, restored = ckpt.restore_newest(abstract)
    ckpt.close()
    assert step == 1
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("warning: checkpoint 2 in ")
    assert f"moved it to {tmp_path / 'stage1' / CORRUPT_DIR / '2'}" in out[0]
    assert (tmp_path / "stage1" / CORRUPT_DIR / "2").is_dir()  # kept, not deleted
    assert checkpoint_steps(directory) == [1]


def _copy(reference_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run, workdir)
    return workdir


def test_corrupt_final_checkpoint_falls_back_and_retrains(reference_run, tmp_path, data_dir,
                                                          compile_cache):
    """The final checkpoint of the last stage zeroed: `train` moves it aside, resumes from the
    one before and ends with the same state as the uninterrupted run; the workdir evaluates."""
    workdir = _copy(reference_run, tmp_path)
    checkpoints = workdir / "stage3" / "checkpoints"
    _corrupt(checkpoints / str(STEPS), "zeroed")
    command = train_command(workdir, data_dir, REFERENCE_ARG, REFERENCE_OVERRIDES)
    result = run_cli(command, compile_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [x for x in result.stdout.splitlines() if x.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and f"checkpoint {STEPS} in " in warnings[0]
    assert f"stage3: resuming from checkpoint {STEPS - 2}" in result.stdout
    assert (workdir / "stage3" / CORRUPT_DIR / str(STEPS)).is_dir()
    got = restore_state(checkpoints, STEPS)
    want = restore_state(reference_run / "stage3" / "checkpoints", STEPS)
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert load_trained(workdir).step == STEPS


def test_load_trained_falls_back_to_an_older_checkpoint(reference_run, tmp_path, capsys):
    workdir = _copy(reference_run, tmp_path)
    _corrupt(workdir / "stage3" / "checkpoints" / str(STEPS), "truncated")
    trained = load_trained(workdir)
    assert (trained.stage, trained.step) == ("stage3", STEPS - 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert [x for x in err if x.startswith("warning:")][0].endswith("using an older one")
    assert (workdir / "stage3" / "checkpoints" / str(STEPS)).is_dir()  # reading moves nothing


# ----------------------------------------------------------------------- resuming


def test_restart_with_another_model_is_refused_before_touching_the_workdir(
        reference_run, tmp_path, data_dir, compile_cache):
    workdir = _copy(reference_run, tmp_path)
    before = (workdir / "config.json").read_bytes()
    command = train_command(workdir, data_dir, REFERENCE_ARG,
                            {**REFERENCE_OVERRIDES, "model.decoder.num_layers": 3})
    result = run_cli(command, compile_cache)
    assert result.returncode == 2
    line = error_line(result)
    assert "model.decoder.num_layers: 2 -> 3" in line and "use a new --workdir" in line
    assert (workdir / "config.json").read_bytes() == before
    assert load_trained(workdir).step == STEPS  # the workdir still loads


def test_restart_with_fewer_steps_and_other_data_warns(reference_run, tmp_path, data_dir,
                                                       compile_cache):
    workdir = _copy(reference_run, tmp_path)
    overrides = {**REFERENCE_OVERRIDES, "stage3.num_steps": 2, "stage3.mixture": "builtin:stage2"}
    result = run_cli(train_command(workdir, data_dir, REFERENCE_ARG, overrides), compile_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(x.startswith("warning: stage3 has checkpoint 4, past the 2 steps asked")
               for x in lines)
    assert any(x.startswith("warning: resuming") and "stage3.mixture: 'builtin:stage3' -> "
               "'builtin:stage2'" in x for x in lines)
    assert checkpoint_steps(workdir / "stage3" / "checkpoints") == [2, STEPS]  # nothing trained
    assert json.loads((workdir / "config.json").read_text())["stage3"]["num_steps"] == 2
