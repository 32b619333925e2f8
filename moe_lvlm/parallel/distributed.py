"""Multi-host start-up: decide from flags and the environment how to call `jax.distributed`.

Call `initialize_from_env()` once, before any other jax call that touches devices. Sources, in
order of precedence:
  1. explicit: `coordinator_address, num_processes, process_id` arguments, else the env variables
     `MOE_LVLM_COORDINATOR` (host:port), `MOE_LVLM_NUM_PROCESSES`, `MOE_LVLM_PROCESS_ID`
     (set by `launch/local.py`); all three or none. `MOE_LVLM_NUM_PROCESSES=1` forces one process.
  2. SLURM: `SLURM_JOB_ID` with `SLURM_NTASKS > 1` (one task per GPU or per node under `srun`);
     jax reads the coordinator, process count and id from SLURM itself.
  3. Cloud TPU VM: jax finds the workers of the slice from the TPU metadata (one process per
     host; a single-host slice gives one process).
  4. otherwise a single process: nothing to initialise.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

ENV_COORDINATOR = "MOE_LVLM_COORDINATOR"
ENV_NUM_PROCESSES = "MOE_LVLM_NUM_PROCESSES"
ENV_PROCESS_ID = "MOE_LVLM_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    """How to start: `mode` is 'single', 'explicit', 'slurm' or 'tpu'; `kwargs` go to
    `jax.distributed.initialize` (None for 'single')."""

    mode: str
    kwargs: dict | None


def _int_setting(name: str, value: int | str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def plan_distributed(
    env: Mapping[str, str],
    on_cloud_tpu_vm: bool,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> DistributedPlan:
    """Pure decision of how (and whether) to call `jax.distributed.initialize`."""
    explicit = {
        ENV_COORDINATOR: coordinator_address or env.get(ENV_COORDINATOR),
        ENV_NUM_PROCESSES: num_processes
        if num_processes is not None
        else env.get(ENV_NUM_PROCESSES),
        ENV_PROCESS_ID: process_id if process_id is not None else env.get(ENV_PROCESS_ID),
    }
    given = {k: v for k, v in explicit.items() if v not in (None, "")}
    if given:
        n = _int_setting(ENV_NUM_PROCESSES, given.get(ENV_NUM_PROCESSES, 0))
        if n == 1:
            return DistributedPlan("single", None)
        missing = sorted(set(explicit) - set(given))
        if missing:
            raise ValueError(
                f"explicit multi-process start needs {', '.join(explicit)}; "
                f"missing {', '.join(missing)} (flags or env)"
            )
        pid = _int_setting(ENV_PROCESS_ID, given[ENV_PROCESS_ID])
        if n < 1 or not 0 <= pid < n:
            raise ValueError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={n})")
        address = str(given[ENV_COORDINATOR])
        if ":" not in address:
            raise ValueError(f"{ENV_COORDINATOR}={address!r} must be host:port")
        return DistributedPlan(
            "explicit", {"coordinator_address": address, "num_processes": n, "process_id": pid}
        )
    if "SLURM_JOB_ID" in env and _int_setting("SLURM_NTASKS", env.get("SLURM_NTASKS", "1")) > 1:
        if "SLURM_STEP_NODELIST" not in env:
            raise ValueError(
                f"SLURM_NTASKS={env['SLURM_NTASKS']} but this process is not inside an `srun` "
                f"step: start it with `srun` (see launch/slurm.sbatch), or set "
                f"{ENV_NUM_PROCESSES}=1 for a single process"
            )
        return DistributedPlan("slurm", {"cluster_detection_method": "slurm"})
    if on_cloud_tpu_vm:
        return DistributedPlan("tpu", {})
    return DistributedPlan("single", None)


def _on_cloud_tpu_vm() -> bool:
    # Set by `import jax` when libtpu and TPU chips are present (jax's own TPU-pod detection).
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize_from_env(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> DistributedPlan:
    """Start `jax.distributed` as flags/env say (module docstring); returns what was done.

    With several processes, CPU collectives (gloo) are enabled so that CPU-only runs reduce
    across processes too (GPU/TPU backends ignore this setting)."""
    plan = plan_distributed(
        os.environ, _on_cloud_tpu_vm(), coordinator_address, num_processes, process_id
    )
    if plan.kwargs is not None:
        if jax.config.jax_cpu_collectives_implementation is None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**plan.kwargs)
    return plan


def is_main_process() -> bool:
    """True on the one process that writes logs, plots and other single-writer files."""
    return jax.process_index() == 0


def device_report() -> str:
    """One line: this process, its devices and the global device count."""
    local = jax.local_devices()
    kinds = sorted({d.device_kind for d in local})
    return (
        f"process {jax.process_index()}/{jax.process_count()}: {len(local)} local "
        f"{jax.default_backend()} devices ({', '.join(kinds)}), "
        f"{jax.device_count()} global"
    )
