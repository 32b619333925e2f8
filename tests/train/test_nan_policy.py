"""nan_policy at the loop level, with batch 3 poisoned with NaN images (stage I of the reference
run's config, run in this process): 'skip' logs the step as non-finite, leaves the state as it
was and trains on; 'stop' raises with the step number after checkpointing the state before it
(the same as the skipping run's checkpoint of that step) with the data position after the bad
batch, so that a restart goes past it (also when that step was checkpointed already, and for
two bad batches in a row)."""

import json
import math
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lvlm.config import validate
from moe_lvlm.data import pipeline
from moe_lvlm.parallel.mesh import make_mesh
from moe_lvlm.train import loop
from moe_lvlm.train.checkpoint import decode_iterator_state
from tests.train.conftest import (
    REFERENCE_ARG,
    REFERENCE_OVERRIDES,
    STEPS,
    checkpoint_steps,
    demo_config,
    restore_state,
)

BAD_STEP = 3
PEAK_LR = 2e-3  # configs/demo.py, stage1


class PoisonedBatches:
    """The pipeline's iterator, with NaN images in the batches numbered `at` (1-based, counted
    from where this run starts); the input ids of every batch served go to `served`."""

    def __init__(self, data, at, served=None):
        self.data, self.at, self.n = data, {at} if isinstance(at, int) else set(at), 0
        self.served = [] if served is None else served

    def __next__(self):
        batch = next(self.data)
        self.n += 1
        self.served.append(np.asarray(batch["input_ids"]))
        if self.n in self.at:
            batch = {**batch, "images": batch["images"] * jnp.nan}
        return batch

    def get_state(self):
        return self.data.get_state()

    def set_state(self, state):
        decode_iterator_state(self.data, state)

    def counts(self):
        return self.data.counts()


def stage1_config(data_dir, **overrides):
    return demo_config(REFERENCE_ARG, {**REFERENCE_OVERRIDES, "stages": "stage1",
                                       "data.data_dir": data_dir, **overrides})


def run_stage1(workdir, data_dir, bad=BAD_STEP, served=None, **overrides):
    cfg = stage1_config(data_dir, **overrides)
    make_data = loop.StageRunner.make_data
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop.StageRunner, "make_data",
                      lambda self, tok: PoisonedBatches(make_data(self, tok), bad, served))
        mesh = make_mesh(validate(cfg, jax.device_count()))
        loop.run(cfg, workdir, mesh, pipeline.load_tokenizer(cfg.data))


def metrics(workdir):
    return [json.loads(x) for x in (workdir / "stage1" / "metrics.jsonl").read_text().splitlines()]


def assert_states_equal(got, want, parts=("params", "opt_state", "rng", "step")):
    for part in parts:
        for a, b in zip(jax.tree.leaves(got[part]), jax.tree.leaves(want[part]), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=part)


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory, data_dir, compile_cache):
    """Workdir of a nan_policy='skip' run that checkpoints (and keeps) every step."""
    workdir = tmp_path_factory.mktemp("skip")
    run_stage1(workdir, data_dir, nan_policy="skip",
               **{"checkpoint.every": 1, "checkpoint.max_to_keep": STEPS})
    return workdir


def test_skip_leaves_the_state_unchanged_and_trains_on(skip_run):
    records = metrics(skip_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 0]
    assert math.isnan(records[2]["loss"]) and math.isfinite(records[3]["loss"])
    # lr(t) = peak * (1 + cos(pi * (t - 1) / 3)) / 2 after 1 warmup step, t = updates applied:
    # the skipped step does not move the schedule, so steps 3 and 4 both use t = 2.
    assert [r["lr"] for r in records] == pytest.approx([0.0, PEAK_LR, 0.75 * PEAK_LR,
                                                        0.75 * PEAK_LR], rel=1e-6)
    checkpoints = skip_run / "stage1" / "checkpoints"
    before, after = restore_state(checkpoints, BAD_STEP - 1), restore_state(checkpoints, BAD_STEP)
    assert int(after["step"]) == BAD_STEP
    assert_states_equal(after, before, parts=("params", "opt_state", "rng"))
    final = restore_state(checkpoints, STEPS)
    kernel = lambda s: s["params"]["projector"]["mlp"]["fc1"]["kernel"]  # noqa: E731
    assert not np.array_equal(kernel(final), kernel(after))


def test_stop_raises_with_the_step_and_saves_the_state_before_it(tmp_path, data_dir, skip_run):
    # No regular checkpoint before the bad step: the one found is the policy's.
    with pytest.raises(loop.NonFiniteLoss, match=f"at step {BAD_STEP};"):
        run_stage1(tmp_path, data_dir, nan_policy="stop", **{"checkpoint.every": STEPS})
    checkpoints = tmp_path / "stage1" / "checkpoints"
    assert checkpoint_steps(checkpoints) == [BAD_STEP - 1]
    want = restore_state(skip_run / "stage1" / "checkpoints", BAD_STEP - 1)
    assert_states_equal(restore_state(checkpoints, BAD_STEP - 1), want)
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(skip_run)[:2]]


def stream(data_dir, n):
    """The input ids of the first n batches of stage I's data, read directly."""
    cfg = stage1_config(data_dir)
    mesh = make_mesh(validate(cfg, jax.device_count()))
    tokenizer = pipeline.load_tokenizer(cfg.data)
    runner = loop.StageRunner(cfg, "stage1", ["stage1"], Path(tempfile.mkdtemp()), mesh,
                              tokenizer)
    data = runner.make_data(tokenizer)
    out = [np.asarray(next(data)["input_ids"]) for _ in range(n)]
    runner.close()
    return out


def test_stop_restart_goes_past_a_bad_batch_after_a_checkpoint(tmp_path, data_dir, skip_run):
    """Checkpoint 2 is a regular one (saved before batch 3 was read): the policy replaces it,
    so the restart trains step 3 on batch 4, as the skipping run trains its step 4."""
    with pytest.raises(loop.NonFiniteLoss, match=f"at step {BAD_STEP};"):
        run_stage1(tmp_path, data_dir, nan_policy="stop", **{"checkpoint.every": 2})
    served = []
    run_stage1(tmp_path, data_dir, bad=(), served=served, nan_policy="stop",
               **{"checkpoint.every": 2})
    batches = stream(data_dir, STEPS + 1)
    assert len(served) == 2
    np.testing.assert_array_equal(served[0], batches[BAD_STEP])  # batch 4, past the bad one
    assert metrics(tmp_path)[2]["loss"] == metrics(skip_run)[3]["loss"]
    checkpoints = tmp_path / "stage1" / "checkpoints"
    assert checkpoint_steps(checkpoints)[-1] == STEPS


def test_stop_restart_goes_past_two_bad_batches_in_a_row(tmp_path, data_dir):
    overrides = {"nan_policy": "stop", "checkpoint.every": 2}
    for bad in (BAD_STEP, 1):  # batch 3, then (after the restart) batch 4
        with pytest.raises(loop.NonFiniteLoss, match=f"at step {BAD_STEP};"):
            run_stage1(tmp_path, data_dir, bad=bad, **overrides)
    served = []
    run_stage1(tmp_path, data_dir, bad=(), served=served, **overrides)
    batches = stream(data_dir, STEPS + 1)
    np.testing.assert_array_equal(served[0], batches[BAD_STEP + 1])  # batch 5
    assert checkpoint_steps(tmp_path / "stage1" / "checkpoints")[-1] == STEPS
