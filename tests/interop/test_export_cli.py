"""`python -m moe_lvlm.export` over a training workdir: the newest checkpoint of the last stage by
default (an upcycled MoE model), or a chosen stage (dense); PyTorch logits match the JAX model's."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import transformers  # noqa: E402  (after the importorskip in hf_helpers)
from flax import traverse_util

from configs import demo
from moe_lvlm.data.tokenizer import train_tokenizer
from moe_lvlm.export import export_workdir
from moe_lvlm.interop import hf_import
from moe_lvlm.models.lvlm import build_model
from moe_lvlm.train.checkpoint import StageCheckpoints
from moe_lvlm.train.stages import dense_variant
from moe_lvlm.workdir import WorkdirError
from tests.interop.hf_helpers import (
    TOL,
    jit_apply,
    max_err,
    random_params,
    tiny_model_config,
    torch,
)

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["USER: what is in the image? ASSISTANT: a red 3 at the top left", "how many digits 0123"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir as `python -m moe_lvlm.train` leaves it: config.json, a dense stage2 checkpoint
    (step 6) and an upcycled stage3 one (steps 2 and 4), with a tokenizer of its own."""
    path = tmp_path_factory.mktemp("workdir")
    tok = train_tokenizer(TEXTS * 10, 300)
    tok.save(str(path / "sp.model"))
    cfg = demo.get_config("steps=0.01")
    cfg.model = tiny_model_config(moe_layers="every_other", vocab_size=tok.vocab_size)
    cfg.model.image_token_id = tok.image_token_id
    cfg.data.tokenizer = str(path / "sp.model")
    cfg.data.aspect = "resize"
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    params = {}
    for stage, steps, model in (
        ("stage2", [6], dense_variant(cfg.model)),
        ("stage3", [2, 4], cfg.model),
    ):
        ckpt = StageCheckpoints(path / stage / "checkpoints", max_to_keep=3, async_save=False)
        for step in steps:
            params[stage, step] = random_params(model, seed=step)
            state = {"step": np.int32(step), "params": params[stage, step]}
            ckpt.save(step, state, None, cfg)
        ckpt.close()
    return path, cfg, params


def test_cli_exports_the_newest_moe_checkpoint(tmp_path, workdir):
    path, cfg, params = workdir
    out = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "moe_lvlm.export", f"--workdir={path}", f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage3 step 4" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == "qwen2_moe"
    assert config["text_config"]["mlp_only_layers"] == [1, 3]
    assert not json.loads((out / "preprocessor_config.json").read_text())["do_pad"]

    model_cfg = cfg.model
    rng = np.random.RandomState(0)
    ids = np.concatenate(
        [[[2, 9]], np.full((1, 4), model_cfg.image_token_id), rng.randint(8, 60, (1, 5))], 1
    )
    images = rng.randn(1, 1, 16, 16, 3).astype(np.float32)
    pos = jnp.arange(ids.shape[1])[None]
    ours, _ = jit_apply(
        build_model(model_cfg), params["stage3", 4], ids, pos, jnp.ones_like(ids), images
    )
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    with torch.no_grad():
        pixels = torch.tensor(images[:, 0].transpose(0, 3, 1, 2))
        theirs = model(input_ids=torch.tensor(ids), pixel_values=pixels).logits.numpy()
    assert max_err(ours, theirs) <= TOL


def test_export_of_a_chosen_dense_stage_reimports_exactly(tmp_path, workdir):
    path, _, params = workdir
    out, stage, step = export_workdir(path, tmp_path / "hf", stage="stage2")
    assert (stage, step) == ("stage2", 6)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == "llama"
    _, imported = hf_import.import_llava(out)
    want = traverse_util.flatten_dict(params["stage2", 6], sep="/")
    got = traverse_util.flatten_dict(imported, sep="/")
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_missing_step_names_the_checkpoints_there(tmp_path, workdir):
    path, _, _ = workdir
    with pytest.raises(WorkdirError, match=r"no checkpoint 3; it has \[2, 4\]"):
        export_workdir(path, tmp_path / "hf", stage="stage3", step=3)
