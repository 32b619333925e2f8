"""The BPE tokenizer backends (HF tokenizer.json, Qwen-1 tiktoken) against the libraries that
define them, and a LLaVA record through the data pipeline with each backend, its ids checked
against LLaVA's own way of tokenizing the whole conversation text."""

import json
import pickle

import numpy as np
import pytest
import tiktoken
import tokenizers
import transformers
from PIL import Image

from configs import base
from moe_lvlm.data import bpe, pipeline
from moe_lvlm.data import tokenizer as tokenizer_lib
from tests.data import bpe_files

TEXTS = [
    "USER: How many digits are in the image? ASSISTANT: item 3",
    "héllo wörld ☃ 12345\n\n  two  spaces\ttab",
    "hello world<|endoftext|>item",
]
# Qwen-1's split pattern and special tokens as Qwen/Qwen-1_8B's tokenization_qwen.py defines them.
QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
            r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [
    f"<|extra_{i}|>" for i in range(205)]


def test_tokenizer_json_matches_tokenizers_and_transformers(tmp_path):
    path = bpe_files.write_tokenizer_json(tmp_path)
    tok = tokenizer_lib.load(str(tmp_path))  # a directory holding tokenizer.json
    assert isinstance(tok, bpe.HFTokenizer) and tok.name == str(path)
    ref = tokenizers.Tokenizer.from_file(str(path))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    n = ref.get_vocab_size()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert ids == fast.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]
    eot = ref.token_to_id("<|endoftext|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (eot, eot, eot)  # config: pad_token null
    assert (tok.image_token_id, tok.im_start_id, tok.im_end_id) == (n, n + 1, n + 2)
    assert tok.vocab_size == n + 3 and not tok.add_bos and tok.leading_space
    assert tok.encode("a<image>b") == tok.encode("a") + [n] + tok.encode("b")
    assert tok.decode([tok.im_start_id, *tok.encode("hi"), tok.im_end_id, eot]) == "hi"
    again = pickle.loads(pickle.dumps(tok))  # grain workers get it pickled
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0]) and again.image_token_id == n
    tok.save(str(tmp_path / "copy" / "tokenizer.json"))
    copy = tokenizer_lib.load(str(tmp_path / "copy" / "tokenizer.json"))
    assert copy.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert (copy.image_token_id, copy.pad_id, copy.vocab_size) == (n, eot, n + 3)


def test_tokenizer_json_with_bos_post_processor(tmp_path):
    """A tokenizer whose post-processor prepends BOS (LLaMA-style) starts texts with it."""
    path = bpe_files.write_tokenizer_json(tmp_path, config=False)
    data = json.loads(path.read_text())
    data["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<|endoftext|>": {
                                  "id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    path.write_text(json.dumps(data))
    tok = tokenizer_lib.load(str(path))
    assert tok.add_bos and tok.bos_id == 0 and tok.encode("hello")[0] != 0


def test_tiktoken_matches_qwen_reference(tmp_path):
    ranks = bpe_files.write_tiktoken(tmp_path / "qwen.tiktoken")
    tok = tokenizer_lib.load(str(tmp_path))  # a directory holding *.tiktoken
    assert isinstance(tok, bpe.TiktokenTokenizer) and tok.file_name == "qwen.tiktoken"
    n = len(ranks)
    ref = tiktoken.Encoding("ref", pat_str=QWEN_PAT, mergeable_ranks=ranks,
                            special_tokens={t: n + i for i, t in enumerate(QWEN_SPECIAL)})
    for text in TEXTS + ["<|im_start|>user\n<|extra_3|>hi<|im_end|>"]:
        assert tok.encode(text) == ref.encode(text, allowed_special="all")
    # Hand-computed: the merges in bpe_files.TIKTOKEN_MERGES, ranked after the 256 bytes.
    assert tok.encode("hello world") == [ranks[b"hello"], ranks[b" world"]]
    assert tok.encode("USER: item") == [ranks[b"USER"], ord(":"), ranks[b" item"]]
    assert tok.encode("e\u0301") == tok.encode("\u00e9")  # NFC, as Qwen's tokenizer
    assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]
    assert tok.decode([n + 1, *tok.encode("hi"), n + 2, n]) == "hi"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n, n)
    assert (tok.im_start_id, tok.im_end_id, tok.image_token_id) == (n + 1, n + 2, n + 208)
    assert tok.vocab_size == n + 209 and not tok.add_bos and tok.leading_space
    assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_arcade100k_tiktoken(tmp_path):
    """StableLM-2's first tokenizer: Qwen's split, its special tokens from 100257 (the largest
    rank 100255 + 2), as stabilityai/stablelm-2-1_6b's tokenization_arcade100k.py numbers them."""
    ranks = bpe_files.write_tiktoken(tmp_path / "arcade100k.tiktoken")
    tok = tokenizer_lib.load(str(tmp_path / "arcade100k.tiktoken"))
    n = len(ranks) + 1  # 100257 for the real file
    ids = {"<|endoftext|>": n, "<|endofprompt|>": n + 19, "<|im_start|>": n + 20,
           "<|im_end|>": n + 21, "<|extra0|>": n + 31}
    ref = tiktoken.Encoding("ref", pat_str=QWEN_PAT, mergeable_ranks=ranks, special_tokens=ids)
    text = "<|im_start|>user\nhello world<|im_end|><|endofprompt|><|extra0|>item 7<|endoftext|>"
    assert tok.encode(text) == ref.encode(text, allowed_special="all")
    assert (tok.eos_id, tok.pad_id, tok.im_start_id, tok.im_end_id) == (n, n, n + 20, n + 21)
    assert tok.image_token_id == n + 32 and tok.vocab_size == n + 33
    assert tok.decode(tok.encode(text)) == "user\nhello worlditem 7"


def test_bad_tokenizer_files_name_the_file(tmp_path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_text("aGVsbG8= 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"qwen.tiktoken line 2: not `base64-token rank`"):
        tokenizer_lib.load(str(bad))
    bpe_files.write_tiktoken(tmp_path / "cl100k_base.tiktoken")
    with pytest.raises(ValueError, match=r"cl100k_base.tiktoken: a tiktoken file holds no split "
                       r"pattern or special tokens, so only the known ones load: \['arcade100k"):
        tokenizer_lib.load(str(tmp_path / "cl100k_base.tiktoken"))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a HuggingFace tokenizer.json"):
        tokenizer_lib.load(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a SentencePiece .*model, a HuggingFace"):
        tokenizer_lib.load(str(tmp_path / "vocab.txt"))


def _llava_ids(chunks, image_id, n_img):
    """LLaVA's tokenizer_image_token: the prompt split at <image>, each chunk tokenized alone."""
    ids = []
    for i, chunk in enumerate(chunks):
        ids += ([image_id] * n_img if i else []) + chunk
    return ids


@pytest.mark.parametrize("backend", ["sentencepiece", "tokenizer.json", "tiktoken"])
def test_llava_record_through_the_pipeline(tmp_path, backend, sp_model_path):
    """vicuna_v1 (as MoE-LLaVA's conv_stablelm/phi/qwen, system prompt off): the ids of
    'USER: <image>\\n{q} ASSISTANT: {a}{eos}' tokenized as LLaVA does, the image tokens spliced in,
    the loss on the answer and its eos only."""
    question, answer = "How many digits are in the image?", "item 3"
    if backend == "sentencepiece":
        import sentencepiece as spm  # noqa: PLC0415

        path = sp_model_path
        sp = spm.SentencePieceProcessor(model_file=path)
        # LLaMA: BOS, and sentencepiece puts the space before the answer itself.
        prompt = [[sp.bos_id(), *sp.encode("USER: ")], sp.encode(f"\n{question} ASSISTANT:")]
        answer_ids, eos = sp.encode(answer), sp.eos_id()
    elif backend == "tokenizer.json":
        path = str(bpe_files.write_tokenizer_json(tmp_path / "tok"))
        ref = tokenizers.Tokenizer.from_file(path)
        enc = ref.encode  # the ByteLevel post-processor adds no BOS
        prompt = [enc("USER: ").ids, enc(f"\n{question} ASSISTANT:").ids]
        eos = ref.token_to_id("<|endoftext|>")
        whole = enc(f"\n{question} ASSISTANT: {answer}<|endoftext|>").ids
        answer_ids = enc(f" {answer}").ids
    else:
        path = str(tmp_path / "qwen.tiktoken")
        ranks = bpe_files.write_tiktoken(tmp_path / "qwen.tiktoken")
        eos = len(ranks)
        ref = tiktoken.Encoding("ref", pat_str=QWEN_PAT, mergeable_ranks=ranks,
                                special_tokens={t: eos + i for i, t in enumerate(QWEN_SPECIAL)})
        enc = lambda text: ref.encode(text, allowed_special="all")  # noqa: E731
        prompt = [enc("USER: "), enc(f"\n{question} ASSISTANT:")]
        whole = enc(f"\n{question} ASSISTANT: {answer}<|endoftext|>")
        answer_ids = enc(f" {answer}")
    if backend != "sentencepiece":  # the answer's tokens are those of the whole text
        assert whole == prompt[1] + answer_ids + [eos]
    tok = tokenizer_lib.load(path)
    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(tmp_path / "img" / "0.png")
    record = {"id": "r0", "image": "0.png", "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}
    (tmp_path / "data.json").write_text(json.dumps([record]))
    cfg = base.get_base_config()
    cfg.data.update(tokenizer=path, seq_len=64, system_prompt="", prefetch=0, read_threads=1)
    n_img = 16  # the base config's tiny vision tower: (32 / 8) ** 2 patches
    it = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=1, train=False,
                                mixture=f"llava:{tmp_path / 'data.json'}?image_root="
                                        f"{tmp_path / 'img'}")
    batch = next(it)
    it.close()
    want = _llava_ids(prompt, tok.image_token_id, n_img) + answer_ids + [eos]
    n = len(want)
    np.testing.assert_array_equal(batch["input_ids"][0, :n], want)
    assert batch["segment_ids"][0, :n].all() and not batch["segment_ids"][0, n:].any()
    trained = np.zeros(n, bool)
    trained[n - len(answer_ids) - 1:] = True  # the answer and its eos
    np.testing.assert_array_equal(batch["loss_mask"][0, :n - 1], trained[1:])
    assert not batch["loss_mask"][0, n - 1:].any()
    np.testing.assert_array_equal(batch["targets"][0, :n - 1], want[1:])
    assert tok.decode(batch["targets"][0][batch["loss_mask"][0] > 0]).strip() == answer
