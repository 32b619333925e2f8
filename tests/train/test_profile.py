"""`config.profile`: the reference run (conftest.py, profile.num_steps=1) leaves a jax.profiler
trace of its step 2 per stage under {workdir}/profile/{stage}, and its console says so."""

import pytest
from jax.profiler import ProfileData

from tests.train.test_metrics import STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_trace_of_the_chosen_step_is_written(reference_run, stage):
    traces = sorted((reference_run / "profile" / stage).rglob("*.xplane.pb"))
    assert len(traces) == 1, traces
    planes = [plane.name for plane in ProfileData.from_file(str(traces[0])).planes]
    assert any(name.startswith("/host:CPU") for name in planes), planes
    console = (reference_run.parent / "stdout.txt").read_text()
    assert f"profile: trace of steps 2-2 in {reference_run / 'profile' / stage}" in console
