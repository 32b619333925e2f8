"""nan_policy at the loop level, with one batch poisoned with NaN images (stage I of the
reference run's config, in this process): 'skip' logs the step as non-finite, leaves the state
as it was and trains on; 'stop' raises with the step number after checkpointing the state
before it (checked against the reference run's checkpoint of that step)."""

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
    checkpoint_steps,
    demo_config,
    restore_state,
)

BAD_STEP = 3


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


def run_stage1(tmp_path, data_dir, monkeypatch, **overrides):
    cfg = demo_config(REFERENCE_ARG, {**REFERENCE_OVERRIDES, "stages": "stage1",
                                      "data.data_dir": data_dir, **overrides})
    make_data = loop.StageRunner.make_data
    monkeypatch.setattr(loop.StageRunner, "make_data",
                        lambda self, tok: PoisonedBatches(make_data(self, tok), BAD_STEP))
    mesh = make_mesh(validate(cfg, jax.device_count()))
    loop.run(cfg, tmp_path, mesh, pipeline.load_tokenizer(cfg.data))


def assert_states_equal(got, want, parts=("params", "opt_state", "rng", "step")):
    for part in parts:
        for a, b in zip(jax.tree.leaves(got[part]), jax.tree.leaves(want[part]), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=part)


def test_stop_raises_with_the_step_and_saves_the_state_before_it(
    tmp_path, data_dir, compile_cache, reference_run, monkeypatch
):
    # No regular checkpoint before the bad step: the one found is the policy's.
    with pytest.raises(loop.NonFiniteLoss, match=f"at step {BAD_STEP};"):
        run_stage1(tmp_path, data_dir, monkeypatch, nan_policy="stop", **{"checkpoint.every": 4})
    checkpoints = tmp_path / "stage1" / "checkpoints"
    assert checkpoint_steps(checkpoints) == [BAD_STEP - 1]
    want = restore_state(reference_run / "stage1" / "checkpoints", BAD_STEP - 1)
    assert_states_equal(restore_state(checkpoints, BAD_STEP - 1), want)


def test_skip_leaves_the_state_unchanged_and_trains_on(
    tmp_path, data_dir, compile_cache, reference_run, monkeypatch
):
    run_stage1(tmp_path, data_dir, monkeypatch, nan_policy="skip", **{"checkpoint.every": 1})
    records, reference = (
        [json.loads(x) for x in (d / "stage1" / "metrics.jsonl").read_text().splitlines()]
        for d in (tmp_path, reference_run)
    )
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 0]
    assert math.isnan(records[2]["loss"]) and math.isfinite(records[3]["loss"])
    assert [r["loss"] for r in records[:2]] == [r["loss"] for r in reference[:2]]
    # The skipped step did not move the schedule: step 4 trains with step 3's lr.
    assert records[3]["lr"] == reference[2]["lr"]
    checkpoints = tmp_path / "stage1" / "checkpoints"
    after_skip = restore_state(checkpoints, BAD_STEP)
    assert int(after_skip["step"]) == BAD_STEP
    want = restore_state(reference_run / "stage1" / "checkpoints", BAD_STEP - 1)
    assert_states_equal(after_skip, want, parts=("params", "opt_state", "rng"))
    final = restore_state(checkpoints, 4)
    assert not np.array_equal(final["params"]["projector"]["mlp"]["fc1"]["kernel"],
                              after_skip["params"]["projector"]["mlp"]["fc1"]["kernel"])
