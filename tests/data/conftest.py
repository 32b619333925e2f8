"""Shared fixtures for the data tests: a tiny SentencePiece model and the built-in dataset."""

import io

import pytest
import sentencepiece as spm

WORDS = (
    "a chat between a curious human and an artificial intelligence assistant the assistant gives "
    "helpful detailed and polite answers to the human's questions you are a helpful assistant "
    "user assistant system what is this it is a cat color red blue item ok describe the image "
    "how many digits are there answer with one word"
)


@pytest.fixture(scope="session")
def sp_model_bytes() -> bytes:
    """A SentencePiece model trained here with the template's specials and pad 0."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([WORDS] * 20 + [f"item {i} ok {i}" for i in range(100)]),
        model_writer=out, vocab_size=400, hard_vocab_limit=False, character_coverage=1.0,
        split_digits=True, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=["<image>", "<|im_start|>", "<|im_end|>"], minloglevel=2,
    )
    return out.getvalue()


@pytest.fixture(scope="session")
def sp_model_path(sp_model_bytes, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    path.write_bytes(sp_model_bytes)
    return str(path)
