"""The exported tokenizer and processor: a PyTorch user's AutoProcessor + generate path (README)."""

import jax.numpy as jnp
import numpy as np
from PIL import Image

from moe_lvlm.data.conversation import VICUNA_SYSTEM, encode_prompt
from moe_lvlm.data.image import preprocess
from moe_lvlm.data.tokenizer import train_tokenizer
from moe_lvlm.interop import hf_export
from moe_lvlm.models.lvlm import build_model
from tests.interop.hf_helpers import jit_apply, random_params, tiny_model_config, torch

import transformers  # noqa: E402  (after the importorskip in hf_helpers)

TEXTS = [
    "a chat between a curious user and an assistant. USER: what is in the image? ASSISTANT: a cat",
    "describe the picture in one word. the answer is red, blue or green 1234567890",
] * 20
TEXTS_NO_IMAGE = ["  two  spaces and 42 cats", "red", "what is in the image?"]
QUESTION = "<image>\nwhat is in the image?"


def test_autoprocessor_tokenizer_and_generate(tmp_path):
    tok = train_tokenizer(TEXTS, 400)
    tok.save(str(tmp_path / "sp.model"))
    cfg = tiny_model_config(moe_layers="every_other", qkv_bias=True, vocab_size=tok.vocab_size)
    cfg.image_token_id = tok.image_token_id
    params = random_params(cfg)
    out = tmp_path / "hf"
    hf_export.export(params, cfg, out, tokenizer_path=str(tmp_path / "sp.model"))

    exact = transformers.SentencePieceBackend.from_pretrained(out)
    fast = transformers.AutoTokenizer.from_pretrained(out)
    for hf_tok in (exact, fast):
        for text in TEXTS_NO_IMAGE:
            assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
        assert hf_tok("red")["input_ids"][0] == tok.bos_id
    assert exact("\u00e9")["input_ids"][1:] == tok.encode("\u00e9")  # byte fallback

    processor = transformers.AutoProcessor.from_pretrained(out, tokenizer=exact)
    fast_ids = transformers.AutoProcessor.from_pretrained(out)(
        images=Image.new("RGB", (16, 16)), text=f"USER: {QUESTION} ASSISTANT:"
    )["input_ids"]
    exact_ids = processor(
        images=Image.new("RGB", (16, 16)), text=f"USER: {QUESTION} ASSISTANT:"
    )["input_ids"]
    assert fast_ids == exact_ids
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (20, 30, 3), np.uint8))
    prompt = f"{VICUNA_SYSTEM} USER: {QUESTION} ASSISTANT:"
    batch = processor(images=image, text=prompt, return_tensors="pt")
    ids = batch["input_ids"].numpy()
    # As the training pipeline encodes it: <image> -> (16 / 8)^2 = 4 patch tokens, CLS dropped.
    want_ids = encode_prompt([("user", QUESTION)], "vicuna_v1", tok, num_image_tokens=4)
    np.testing.assert_array_equal(ids[0], want_ids)
    want_pixels = preprocess(image, 16, cfg.vision.mean, cfg.vision.std, aspect="resize")
    got_pixels = batch["pixel_values"].numpy()[0].transpose(1, 2, 0)
    np.testing.assert_allclose(got_pixels, want_pixels, atol=1e-5)

    model = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=1, do_sample=False)
    pos = jnp.arange(ids.shape[1])[None]
    logits, _ = jit_apply(
        build_model(cfg), params, ids, pos, jnp.ones_like(ids), got_pixels[None, None]
    )
    assert int(generated[0, -1]) == int(np.argmax(logits[0, -1]))
