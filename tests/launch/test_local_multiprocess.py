"""launch/local.py: a real two-process JAX job on this machine (CPU, gloo collectives)."""

import json
import os
import time

import numpy as np

from launch import local

HERE = os.path.dirname(os.path.abspath(__file__))
# The child modules live beside this file; the repo root comes first so `moe_lvlm` imports.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([local.REPO_ROOT, HERE])}


def reference_value() -> np.ndarray:
    """mean over the whole global batch of tanh(x @ w), in numpy (inputs as in the child)."""
    x = np.arange(8 * 3, dtype=np.float64).reshape(8, 3) / 10
    w = np.linspace(-1, 1, 15).reshape(3, 5)
    return np.tanh(x @ w).mean(axis=0)


def results_of(outputs):
    return [json.loads(next(line[len("RESULT "):] for line in r.output.splitlines()
                            if line.startswith("RESULT "))) for r in outputs]


def test_two_processes_reduce_across_processes_like_one():
    two = local.run_local("multiprocess_check", [], num_processes=2, devices_per_process=2,
                          timeout_s=120, env=ENV, echo=False)
    assert [r.returncode for r in two] == [0, 0], "\n".join(r.output for r in two)
    one = local.run_local("multiprocess_check", [], num_processes=1, devices_per_process=4,
                          timeout_s=120, env=ENV, echo=False)
    assert one[0].returncode == 0, one[0].output

    multi, single = results_of(two), results_of(one)[0]
    for pid, r in enumerate(multi):
        assert (r["mode"], r["process_index"], r["process_count"]) == ("explicit", pid, 2)
        assert (r["local_devices"], r["global_devices"], r["local_rows"]) == (2, 4, 4)
        assert r["is_main"] == (pid == 0)
        assert r["report"] == f"process {pid}/2: 2 local cpu devices (cpu), 4 global"
        np.testing.assert_allclose(r["value"], reference_value(), rtol=1e-5, atol=1e-6)
    assert (single["mode"], single["process_count"], single["local_rows"]) == ("single", 1, 8)
    np.testing.assert_allclose(single["value"], reference_value(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(multi[0]["value"], single["value"], rtol=1e-6)


def test_one_failure_stops_the_others():
    start = time.monotonic()
    results = local.run_local("fail_or_hang", ["--exit-code=3"], num_processes=2, timeout_s=60,
                              env=ENV, echo=False)
    assert time.monotonic() - start < 30
    assert results[1].returncode == 3 and "process 1 failing" in results[1].output
    assert results[0].returncode < 0  # stopped by a signal while it was still waiting
    assert local.exit_status(results) == 3


def test_dry_run_prints_each_process_command(capsys):
    args = ["--config=configs/demo.py:size=s", "--workdir=/tmp/w", "--config.name=a b"]
    assert local.main(["--num-processes=2", "--devices-per-process=3", "--port=4567",
                       "--dry-run", "moe_lvlm.train", *args]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"MOE_LVLM_COORDINATOR=127.0.0.1:4567 MOE_LVLM_NUM_PROCESSES=2 MOE_LVLM_PROCESS_ID={i} "
        f"JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=3 python -m moe_lvlm.train "
        "--config=configs/demo.py:size=s --workdir=/tmp/w '--config.name=a b'"
        for i in range(2)
    ]


def test_cli_passes_arguments_through_and_returns_the_failure_code(monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    rc = local.main(["--num-processes=2", "--timeout=60", "fail_or_hang", "--", "--exit-code=5"])
    assert rc == 5
    assert "[p1] process 1 failing with 5" in capsys.readouterr().out


def test_exit_status_of_a_preempted_job():
    def results(*codes):
        return [local.ProcessResult(i, c, "") for i, c in enumerate(codes)]

    assert local.exit_status(results(75, 75)) == 75
    assert local.exit_status(results(0, 75)) == 75  # the other had finished already
    assert local.exit_status(results(75, 3)) == 3  # a real failure wins
    assert local.exit_status(results(75, -15)) == 1
