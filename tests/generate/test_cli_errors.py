"""docs/reliability.md, evaluate/generate/export rows, through the commands' entry points
(`cli.run_argparse(main)` / `cli.run_absl(main)`, what `python -m ...` runs): a user mistake is
one line `error: ...` and exit code 2, with the workdir usable afterwards."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moe_lvlm import cli, evaluate, generate
from moe_lvlm.workdir import load_trained
from tests.generate.tiny_workdir import make_workdir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("cli_errors"))


def one_error_line(capsys, call) -> str:
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == cli.USER_ERROR_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("prompt, with_image, message", [
    ("   ", False, "the prompt is empty"),
    ("<image>\nWhat is this?", False, "the prompt holds <image> but no --image was given"),
    ("<image> and <image>?", True, "the prompt holds 2 <image> placeholders"),
])
def test_generate_rejects_prompts_training_rejects(workdir, capsys, image, prompt, with_image,
                                                   message):
    args = ["--workdir", str(workdir), "--prompt", prompt, "--max_new_tokens=2"]
    args += ["--image", image] if with_image else []
    assert message in one_error_line(capsys, lambda: cli.run_argparse(generate.main, args))


def test_generate_accepts_the_users_own_placeholder(workdir, capsys, image):
    generate.main(["--workdir", str(workdir), "--prompt", "What is <image>?", "--image", image,
                   "--max_new_tokens=2"])
    assert capsys.readouterr().err.startswith(f"[{workdir} stage3 step 7]")


def test_missing_workdir_is_one_line(tmp_path, capsys):
    line = one_error_line(capsys, lambda: cli.run_argparse(
        generate.main, ["--workdir", str(tmp_path / "nope"), "--prompt", "hi"]))
    assert "config.json not found" in line


def test_evaluate_on_a_read_only_workdir_names_out_dir(workdir, tmp_path, capsys, monkeypatch):
    """Tests run as root, where a chmod does not stop writes: the workdir's file system is made
    read-only by failing every mkdir under it as the kernel would (EROFS)."""
    mkdir = os.mkdir

    def read_only_mkdir(path, *args, **kwargs):
        if os.fspath(path).startswith(str(workdir)):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    args = ["--workdir", str(workdir), "--split", "builtin:test", "--limit=1"]
    line = one_error_line(capsys, lambda: cli.run_argparse(evaluate.main, args))
    assert line.startswith(f"error: cannot write answers to {workdir}/eval/")
    assert line.endswith("Read-only file system (a read-only workdir?); pass --out_dir=DIR")


def test_evaluate_of_an_empty_split_is_one_line(workdir, tmp_path, capsys):
    (tmp_path / "empty.json").write_text("[]")
    args = ["--workdir", str(workdir), f"--split=llava:{tmp_path}/empty.json",
            f"--out_dir={tmp_path}/out"]
    line = one_error_line(capsys, lambda: cli.run_argparse(evaluate.main, args))
    assert line == f"error: {tmp_path}/empty.json holds no records"


def test_export_of_an_unreadable_checkpoint_is_one_line_subprocess(workdir, tmp_path):
    """As a user runs it: the only checkpoint's state folder is gone."""
    broken = tmp_path / "workdir"
    shutil.copytree(workdir, broken)
    shutil.rmtree(broken / "stage3" / "checkpoints" / "7" / "state")
    result = subprocess.run(
        [sys.executable, "-m", "moe_lvlm.export", f"--workdir={broken}", f"--out={tmp_path}/hf"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"error: checkpoint 7 in {broken}/stage3/checkpoints does not "
                               "restore (")
    assert load_trained(workdir).step == 7  # the original is untouched
