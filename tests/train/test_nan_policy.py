"""nan_policy at the loop level, with batch 3 poisoned with NaN images (stage I of the reference
run's config, run in this process): 'skip' logs the step as non-finite, leaves the state as it
was and trains on; 'stop' raises with the step number after checkpointing the state before it
(the same as the skipping run's checkpoint of that step)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lvlm.config import validate
from moe_lvlm.data import pipeline
from moe_lvlm.parallel.mesh import make_mesh
from moe_lvlm.train import loop
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
    """The pipeline's iterator, with NaN images in batch number `at` (1-based)."""

    def __init__(self, data, at: int):
        self.data, self.at, self.n = data, at, 0

    def __next__(self):
        batch = next(self.data)
        self.n += 1
        if self.n == self.at:
            batch = {**batch, "images": batch["images"] * jnp.nan}
        return batch

    def get_state(self):
        return self.data.get_state()

    def counts(self):
        return self.data.counts()


def run_stage1(workdir, data_dir, **overrides):
    cfg = demo_config(REFERENCE_ARG, {**REFERENCE_OVERRIDES, "stages": "stage1",
                                      "data.data_dir": data_dir, **overrides})
    make_data = loop.StageRunner.make_data
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop.StageRunner, "make_data",
                      lambda self, tok: PoisonedBatches(make_data(self, tok), BAD_STEP))
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
