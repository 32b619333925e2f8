"""Chat templates against ids built here from the SentencePiece model's own pieces."""

import io

import numpy as np
import pytest
import sentencepiece as spm

from moe_lvlm.data import conversation
from moe_lvlm.data.tokenizer import SentencePieceTokenizer, Tokenizer

N = 4  # image tokens per image in these tests
CONV = [
    {"from": "human", "value": "<image>\nWhat is this?"},
    {"from": "gpt", "value": "It is a cat."},
    {"from": "human", "value": "Color?"},
    {"from": "gpt", "value": "Red."},
]
VICUNA_SYS = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@pytest.fixture
def sp(sp_model_bytes):
    return spm.SentencePieceProcessor(model_proto=sp_model_bytes)


@pytest.fixture
def tok(sp_model_bytes):
    return SentencePieceTokenizer(sp_model_bytes)


def _build(parts):
    """parts: [(ids, trained)] -> (ids, mask) as numpy arrays."""
    ids = [i for p, _ in parts for i in p]
    mask = [t for p, t in parts for _ in p]
    return np.array(ids), np.array(mask)


def test_tokenizer_ids(tok, sp):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.image_token_id == sp.piece_to_id("<image>") == 4
    assert (tok.im_start_id, tok.im_end_id) == (5, 6)
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.encode("it is a cat") == sp.encode("it is a cat")
    assert tok.decode(sp.encode("it is a cat") + [0, 0]) == "it is a cat"
    assert tok.added_tokens == ()


def test_tokenizer_adds_missing_specials(tmp_path):
    # A model as LLaMA's: unk 0, bos 1, eos 2, no pad and none of the template's specials.
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world foo bar"] * 30),
                                   model_writer=out, vocab_size=30, hard_vocab_limit=False,
                                   minloglevel=2)
    path = tmp_path / "plain.model"
    path.write_bytes(out.getvalue())
    base = spm.SentencePieceProcessor(model_proto=out.getvalue())
    tok = Tokenizer.from_file(str(path))
    n = base.get_piece_size()
    assert tok.vocab_size == n + 3
    assert (tok.image_token_id, tok.im_start_id, tok.im_end_id) == (n, n + 1, n + 2)
    assert tok.added_tokens == ("<image>", "<|im_start|>", "<|im_end|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    ids = tok.encode("hello <image> world")
    assert ids.count(n) == 1  # one atomic piece, not '<', 'i', ...
    assert tok.decode(ids) == "hello <image> world"


def test_vicuna_v1(tok, sp):
    img, bos, eos = sp.piece_to_id("<image>"), sp.bos_id(), sp.eos_id()
    ids, mask = _build([
        ([bos], False),
        (sp.encode(f"{VICUNA_SYS} USER: "), False),
        ([img] * N, False),
        (sp.encode("\nWhat is this? ASSISTANT:"), False),
        (sp.encode("It is a cat.") + [eos], True),
        (sp.encode("USER: Color? ASSISTANT:"), False),
        (sp.encode("Red.") + [eos], True),
    ])
    turns = conversation.turns_from_llava(CONV)
    enc = conversation.encode(turns, "vicuna_v1", tok, N)
    np.testing.assert_array_equal(enc.ids, ids)
    np.testing.assert_array_equal(enc.train, mask)
    prompt = conversation.encode_prompt(turns[:3], "vicuna_v1", tok, N)
    np.testing.assert_array_equal(prompt, ids[: len(ids) - len(sp.encode("Red.")) - 1])


def test_chatml(tok, sp):
    img, start, end = (sp.piece_to_id(p) for p in ("<image>", "<|im_start|>", "<|im_end|>"))
    ids, mask = _build([
        ([start] + sp.encode("system\nYou are a helpful assistant.") + [end], False),
        ([start] + sp.encode("user\n") + [img] * N + sp.encode("\nWhat is this?"), False),
        ([end, start] + sp.encode("assistant\n"), False),
        (sp.encode("It is a cat.") + [end], True),
        ([start] + sp.encode("user\nColor?") + [end, start] + sp.encode("assistant\n"), False),
        (sp.encode("Red.") + [end], True),
    ])
    enc = conversation.encode(conversation.turns_from_llava(CONV), "chatml", tok, N)
    np.testing.assert_array_equal(enc.ids, ids)
    np.testing.assert_array_equal(enc.train, mask)


def test_no_system_prompt_and_text_only(tok, sp):
    turns = [("user", "What is this?"), ("assistant", "A cat.")]
    enc = conversation.encode(turns, "vicuna_v1", tok, N, system="")
    ids, mask = _build([([sp.bos_id()], False),
                        (sp.encode("USER: What is this? ASSISTANT:"), False),
                        (sp.encode("A cat.") + [sp.eos_id()], True)])
    np.testing.assert_array_equal(enc.ids, ids)
    np.testing.assert_array_equal(enc.train, mask)


def test_plain(tok, sp):
    turns = [("user", "<image>\nDescribe the image."), ("assistant", "A cat.")]
    enc = conversation.encode(turns, "plain", tok, N)
    ids, mask = _build([([sp.bos_id()] + [sp.piece_to_id("<image>")] * N, False),
                        (sp.encode("A cat.") + [sp.eos_id()], True)])
    np.testing.assert_array_equal(enc.ids, ids)
    np.testing.assert_array_equal(enc.train, mask)


def test_truncate_keeps_image_tokens(tok):
    enc = conversation.encode(conversation.turns_from_llava(CONV), "vicuna_v1", tok, N, system="")
    first_image = int(np.flatnonzero(enc.ids == tok.image_token_id)[0])
    cut = conversation.truncate(enc, len(enc.ids) - 3, tok.image_token_id)
    np.testing.assert_array_equal(cut.ids, enc.ids[:-3])
    with pytest.raises(conversation.BadRecord, match="image tokens end") as e:
        conversation.truncate(enc, first_image + 2, tok.image_token_id)
    assert e.value.reason == "too_long"
    answer_start = int(np.flatnonzero(enc.train)[0])
    with pytest.raises(conversation.BadRecord, match="no answer token") as e:
        conversation.truncate(enc, answer_start, tok.image_token_id)


@pytest.mark.parametrize("conv, reason", [
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "not_alternating"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], "not_alternating"),
    ([{"from": "human", "value": "a"}], "not_alternating"),
    ([{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}], "malformed_record"),
    ([], "malformed_record"),
    ("hello", "malformed_record"),
])
def test_turn_validation(conv, reason):
    with pytest.raises(conversation.BadRecord) as e:
        conversation.turns_from_llava(conv)
    assert e.value.reason == reason
