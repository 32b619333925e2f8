"""`python -m moe_lvlm.generate` on a tiny workdir: the prompt is built with the training chat
template and the image preprocessed as in training (both rebuilt here by hand from the
documented formats), then answered greedily as a full recompute does."""

import json

import numpy as np
import pytest
from PIL import Image

from moe_lvlm import generate
from moe_lvlm.data.tokenizer import Tokenizer
from moe_lvlm.workdir import load_trained
from tests.generate.tiny_workdir import make_workdir, reference_greedy

STEPS = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("generate_cli"))


def _vision_config(workdir):
    return json.loads((workdir / "config.json").read_text())["model"]["vision"]


def _preprocess_by_hand(path, workdir, size=32):
    """LLaVA 'pad': pad to a square with the mean colour (image centred), bicubic resize,
    scale to [0, 1], normalise with the mean/std that the workdir's config.json names."""
    vision = _vision_config(workdir)
    mean, std = np.array(vision["mean"], np.float32), np.array(vision["std"], np.float32)
    img = Image.open(path).convert("RGB")
    w, h = img.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in vision["mean"]))
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    x = np.asarray(square.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
    return (x - mean) / std


def _expected_answer(workdir, prompt_ids, pixels):
    trained = load_trained(workdir)
    tok = trained.tokenizer
    image = None if pixels is None else pixels[None, None]
    new = reference_greedy(trained.model, trained.params, prompt_ids, image, STEPS,
                           (tok.eos_id,), vocab_size=tok.vocab_size)
    return tok.decode([t for t in new if t != tok.eos_id]).strip()


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_generate_cli_answers_like_training_template(workdir, tmp_path, capsys, with_image):
    tok = Tokenizer.from_file(str(workdir.parent / "tokenizer.model"))
    question = "What color is the 3?"
    args = ["--workdir", str(workdir), "--prompt", question, f"--max_new_tokens={STEPS}"]
    # vicuna_v1 with the demo's empty system prompt: <s> "USER: <image>\n{q} ASSISTANT:".
    if with_image:
        path = tmp_path / "scene.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(path)
        args += ["--image", str(path)]
        vision = _vision_config(workdir)
        image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
        prompt = ([tok.bos_id] + tok.encode("USER: ") + [tok.image_token_id] * image_tokens
                  + tok.encode(f"\n{question} ASSISTANT:"))
        pixels = _preprocess_by_hand(path, workdir)
    else:
        prompt = [tok.bos_id] + tok.encode(f"USER: {question} ASSISTANT:")
        pixels = None
    generate.main(args)
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.strip() == _expected_answer(workdir, prompt, pixels)


def test_generate_cli_missing_image_names_the_file(workdir, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError, match="nope.png"):
        generate.main(["--workdir", str(workdir), "--prompt", "hi", "--image", str(missing)])
