"""How `moe_lvlm.parallel.distributed` decides to start jax.distributed."""

import jax
import pytest

from moe_lvlm.parallel import distributed
from moe_lvlm.parallel.distributed import DistributedPlan, plan_distributed

EXPLICIT = {"MOE_LVLM_COORDINATOR": "10.0.0.1:1234", "MOE_LVLM_NUM_PROCESSES": "4",
            "MOE_LVLM_PROCESS_ID": "3"}
SLURM = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "5",
         "SLURM_STEP_NODELIST": "gpu[01-02]"}


def test_nothing_set_is_single_process():
    assert plan_distributed({}, on_cloud_tpu_vm=False) == DistributedPlan("single", None)


def test_explicit_env():
    plan = plan_distributed(EXPLICIT, on_cloud_tpu_vm=False)
    assert plan == DistributedPlan(
        "explicit", {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3})


def test_flags_override_env_and_explicit_beats_slurm_and_tpu():
    plan = plan_distributed({**EXPLICIT, **SLURM}, True, "h:9", 2, 0)
    assert plan.kwargs == {"coordinator_address": "h:9", "num_processes": 2, "process_id": 0}


def test_one_process_means_no_initialisation_even_under_slurm():
    assert plan_distributed({**SLURM, "MOE_LVLM_NUM_PROCESSES": "1"}, True).mode == "single"


@pytest.mark.parametrize("env, message", [
    ({"MOE_LVLM_COORDINATOR": "h:1", "MOE_LVLM_NUM_PROCESSES": "2"}, "missing MOE_LVLM_PROCESS_ID"),
    ({**EXPLICIT, "MOE_LVLM_PROCESS_ID": "4"}, r"MOE_LVLM_PROCESS_ID=4 must be in \[0, "),
    ({**EXPLICIT, "MOE_LVLM_NUM_PROCESSES": "two"}, "MOE_LVLM_NUM_PROCESSES='two' is not an int"),
    ({**EXPLICIT, "MOE_LVLM_COORDINATOR": "localhost"}, "must be host:port"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, "not inside an `srun`"),
])
def test_bad_settings_are_named(env, message):
    with pytest.raises(ValueError, match=message):
        plan_distributed(env, on_cloud_tpu_vm=False)


def test_slurm_with_several_tasks_uses_jax_slurm_detection():
    assert plan_distributed(SLURM, False) == DistributedPlan(
        "slurm", {"cluster_detection_method": "slurm"})
    assert plan_distributed({**SLURM, "SLURM_NTASKS": "1"}, False).mode == "single"


def test_cloud_tpu_vm_lets_jax_find_the_workers():
    assert plan_distributed({}, on_cloud_tpu_vm=True) == DistributedPlan("tpu", {})


def test_initialize_from_env_calls_jax_with_the_plan(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for key, value in EXPLICIT.items():
        monkeypatch.setenv(key, value)
    plan = distributed.initialize_from_env()
    assert plan.mode == "explicit" and calls == [plan.kwargs]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_single_process_does_not_call_jax(monkeypatch):
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("called"))
    for key in [*EXPLICIT, *SLURM]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    assert distributed.initialize_from_env().mode == "single"
    assert distributed.is_main_process()
    assert distributed.device_report().startswith("process 0/1: ")
