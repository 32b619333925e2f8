"""`<image>` anywhere in a turn (question first, as the built-in data puts it, or between two
parts of the question): tokens, image splice and loss mask of a batch against ids built here
from the SentencePiece model's own pieces."""

import json

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from configs import base
from moe_lvlm.data import pipeline
from moe_lvlm.data.tokenizer import SentencePieceTokenizer
from moe_lvlm.models.decoder import splice_image_features

N_IMG = 16  # image tokens at the base config's 32x32 input and 8x8 patches
SEQ = 64


@pytest.mark.parametrize("user, parts", [
    ("what color is the item?\n<image>", ("what color is the item?\n", "")),
    ("describe the image\n<image>\nhow many digits are there",
     ("describe the image\n", "\nhow many digits are there")),
])
def test_image_inside_the_question(tmp_path, sp_model_bytes, sp_model_path, user, parts):
    sp = spm.SentencePieceProcessor(model_proto=sp_model_bytes)
    tok = SentencePieceTokenizer(sp_model_bytes)
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "a.png")
    records = [{"id": "q-0", "image": "a.png", "conversations": [
        {"from": "human", "value": user}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "c.json").write_text(json.dumps(records))
    cfg = base.get_base_config()
    cfg.data.update(tokenizer=sp_model_path, seq_len=SEQ, system_prompt="", prefetch=0,
                    read_threads=1, bad_records="strict")
    it = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=1,
                                mixture=f"llava:{tmp_path / 'c.json'}?image_root={tmp_path}",
                                train=False)
    batch = next(it)
    it.close()

    # vicuna_v1 without system prompt: <s> "USER: {before}" <image> x N "{after} ASSISTANT:"
    # ["red" </s>]; the text on either side of <image> is encoded on its own.
    before, after = parts
    context = ([sp.bos_id()] + sp.encode(f"USER: {before}") + [sp.piece_to_id("<image>")] * N_IMG
               + sp.encode(f"{after} ASSISTANT:"))
    answer = sp.encode("red") + [sp.eos_id()]
    ids = np.array(context + answer)
    n = len(ids)
    assert n <= SEQ
    np.testing.assert_array_equal(batch["input_ids"][0, :n], ids)
    np.testing.assert_array_equal(batch["input_ids"][0, n:], 0)
    np.testing.assert_array_equal(batch["targets"][0, :n - 1], ids[1:])
    # Trained: the targets that are answer tokens or </s>, i.e. positions len(context)-1 .. n-2.
    mask = np.zeros(SEQ, bool)
    mask[len(context) - 1:n - 1] = True
    np.testing.assert_array_equal(batch["loss_mask"][0] > 0, mask)

    # Splice: the j-th <image> position takes image feature j; every other position keeps its
    # token embedding.
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(1, SEQ, 8)).astype(np.float32)
    features = rng.normal(size=(1, N_IMG, 8)).astype(np.float32)
    start = 1 + len(sp.encode(f"USER: {before}"))
    expected = embeds.copy()
    expected[0, start:start + N_IMG] = features[0]
    out = splice_image_features(embeds, batch["input_ids"], features, tok.image_token_id)
    np.testing.assert_array_equal(np.asarray(out), expected)
