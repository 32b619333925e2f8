"""The exported tokenizer and processor: AutoTokenizer and the exact SentencePieceBackend encode
and decode as sentencepiece does, and a PyTorch user's AutoProcessor + generate path (README)
gives the ids, pixels and next token of this project's pipeline and model."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import transformers  # noqa: E402  (after the importorskip in hf_helpers)
from PIL import Image

from moe_lvlm.data.conversation import VICUNA_SYSTEM, encode_prompt
from moe_lvlm.data.image import preprocess
from moe_lvlm.data.tokenizer import SPECIAL_TOKENS, SentencePieceTokenizer, Tokenizer
from moe_lvlm.interop import hf_export
from moe_lvlm.models.lvlm import build_model
from tests.interop.hf_helpers import jit_apply, random_params, tiny_model_config, torch

CORPUS = [
    "a chat between a curious user and an assistant. USER: what is in the image? ASSISTANT: a cat",
    "describe the picture in one word. the answer is red, blue or green 1234567890",
] * 20
TEXTS = ["  two  spaces and 42 cats ", " red", "what is\tin the image?\n", "é ü 漢字", ""]
QUESTION = "<image>\nwhat is in the image?"


def sentencepiece(kind: str) -> bytes:
    """'unigram': the project's kind (nmt_nfkc normalisation, whitespace collapsed, specials);
    'bpe': LLaMA's kind (no normalisation, whitespace kept, no specials: the project adds them)."""
    out = io.BytesIO()
    common = dict(
        sentence_iterator=iter(CORPUS),
        model_writer=out,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
    )
    if kind == "unigram":
        spm.SentencePieceTrainer.train(
            **common,
            vocab_size=400,
            model_type="unigram",
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            user_defined_symbols=list(SPECIAL_TOKENS),
        )
    else:
        spm.SentencePieceTrainer.train(
            **common,
            vocab_size=340,
            model_type="bpe",
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
        )
    return out.getvalue()


def export_with_tokenizer(out, tok: Tokenizer, **kw):
    cfg = tiny_model_config(moe_layers="every_other", qkv_bias=True, vocab_size=tok.vocab_size)
    cfg.image_token_id = tok.image_token_id
    params = random_params(cfg)
    hf_export.export(params, cfg, out, tokenizer=tok, **kw)
    return cfg, params


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_tokenizers_encode_and_decode_like_sentencepiece(tmp_path, kind):
    tok = SentencePieceTokenizer(sentencepiece(kind))
    export_with_tokenizer(tmp_path, tok)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.piece_to_id("<image>") == tok.image_token_id
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path)
    exact = transformers.SentencePieceBackend.from_pretrained(tmp_path)
    for text in TEXTS:
        want = sp.encode(text)
        assert fast(text, add_special_tokens=False)["input_ids"] == want, (kind, text)
        assert exact(text, add_special_tokens=False)["input_ids"] == want, (kind, text)
        assert fast(text)["input_ids"] == [sp.bos_id(), *want]
        assert fast.decode(want) == sp.decode(want), (kind, text)
    # Text around <image> is encoded piece by piece, as the training pipeline does it.
    want = [*sp.encode("USER: "), tok.image_token_id, *sp.encode("\nwhat? ASSISTANT:")]
    assert fast("USER: <image>\nwhat? ASSISTANT:", add_special_tokens=False)["input_ids"] == want


def test_autoprocessor_and_generate_follow_the_pipeline(tmp_path):
    tok = SentencePieceTokenizer(sentencepiece("unigram"))
    cfg, params = export_with_tokenizer(tmp_path, tok, aspect="pad")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(model, transformers.LlavaForConditionalGeneration)

    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (20, 30, 3), np.uint8))
    batch = processor(
        images=image, text=f"{VICUNA_SYSTEM} USER: {QUESTION} ASSISTANT:", return_tensors="pt"
    )
    ids = batch["input_ids"].numpy()
    # <image> -> (16 / 8)^2 = 4 patch tokens (CLS dropped), as the training pipeline encodes it.
    want_ids = encode_prompt([("user", QUESTION)], "vicuna_v1", tok, num_image_tokens=4)
    np.testing.assert_array_equal(ids[0], want_ids)
    pixels = batch["pixel_values"].numpy()[0].transpose(1, 2, 0)
    want_pixels = preprocess(image, 16, cfg.vision.mean, cfg.vision.std, aspect="pad")
    np.testing.assert_allclose(pixels, want_pixels, atol=1e-5)

    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=1, do_sample=False)
    pos = jnp.arange(ids.shape[1])[None]
    logits, _ = jit_apply(
        build_model(cfg), params, ids, pos, jnp.ones_like(ids), pixels[None, None]
    )
    assert int(generated[0, -1]) == int(np.argmax(logits[0, -1]))
    assert processor.decode(generated[0, :-1], skip_special_tokens=True).startswith(VICUNA_SYSTEM)


def test_export_refuses_a_tokenizer_the_model_was_not_trained_with(tmp_path):
    tok = SentencePieceTokenizer(sentencepiece("unigram"))
    cfg = tiny_model_config(vocab_size=64)
    cfg.image_token_id = tok.image_token_id
    with pytest.raises(hf_export.ExportError, match="more than the model's decoder.vocab_size=64"):
        hf_export.export(random_params(cfg), cfg, tmp_path, tokenizer=tok)
    assert not list(tmp_path.iterdir())
