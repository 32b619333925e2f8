"""Export of BPE tokenizers: what transformers loads from the exported files encodes, decodes and
pads as the run's tokenizer (a tokenizer.json as it is; Qwen-1's tiktoken converted)."""

import pytest
import transformers

from moe_lvlm.data import tokenizer as tokenizer_lib
from moe_lvlm.interop import hf_tokenizer
from tests.data import bpe_files

TEXTS = [
    "A chat between a curious human and an artificial intelligence assistant. USER: <image>\n"
    "How many digits are in the image? ASSISTANT: item 3<|endoftext|>",
    "hello world, héllo wörld ☃ 12345 item 17 ok 17\n\n  two  spaces\ttab's don't",
    "<|im_start|>user\nWhat color is the 3?<|im_end|><|im_start|>assistant\nred<|im_end|>",
]


@pytest.mark.parametrize("kind", ["tokenizer.json", "qwen.tiktoken", "arcade100k.tiktoken"])
def test_exported_tokenizer_matches_the_run(tmp_path, kind):
    trained = bpe_files.write_tokenizer_json(tmp_path / "bpe")
    if kind.endswith(".tiktoken"):
        bpe_files.write_tiktoken_from_bpe(tmp_path / kind, trained)
        tok = tokenizer_lib.load(str(tmp_path / kind))
    else:
        tok = tokenizer_lib.load(str(trained))
    out = tmp_path / "hf"
    out.mkdir()
    special = hf_tokenizer.write_tokenizer(tok, out, "chatml")
    assert special == dict(bos_token_id=tok.bos_id, eos_token_id=[tok.im_end_id, tok.eos_id],
                           pad_token_id=tok.pad_id)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids == hf.encode(text), text
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    if kind.endswith(".tiktoken"):  # single bytes are ranks 0..255; invalid UTF-8 decodes alike
        ids = [0xC3, 0xA9, 0xFF, 0x41, 0xE2, 0x98, 0x42, 0xC3]
        assert hf.decode(ids) == tok.decode(ids) == "é\ufffdA\ufffdB\ufffd"
    assert hf.convert_tokens_to_ids("<image>") == tok.image_token_id
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert hf.padding_side == "left" and hf.image_token == "<image>"
    batch = hf(["item 3", "hello world item"], padding=True)["input_ids"]
    assert batch[0][0] == tok.pad_id and batch[1][0] != tok.pad_id  # padded on the left
