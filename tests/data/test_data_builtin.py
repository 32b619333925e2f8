"""The built-in digit-scenes dataset: built once, splits, held-out images, tokenizer, pipeline."""

import json
import os
import re

import numpy as np
import pytest

from configs import base
from moe_lvlm.data import builtin, pipeline, sources


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builtin.ensure_built(data_dir)
    return data_dir


def _records(data_dir, split, n=None):
    src = sources.open_source(f"builtin:{split}", data_dir)
    return [src[i] for i in range(len(src) if n is None else n)]


def _file_stamps(directory: str) -> dict[str, int]:
    return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
            for root, _, names in os.walk(directory) for name in names}


def test_builds_once(built):
    data_dir = built
    version_dir = os.path.join(data_dir, "digit_scenes", str(builtin.DigitScenes.VERSION))
    assert os.path.exists(os.path.join(version_dir, "tokenizer.model"))
    before = _file_stamps(data_dir)
    assert builtin.ensure_built(data_dir).rstrip("/").endswith(os.path.basename(version_dir))
    assert _file_stamps(data_dir) == before  # found prepared: nothing rewritten


def test_split_sizes_and_fields(built):
    data_dir = built
    for split, size in builtin.SPLIT_SIZES.items():
        assert len(sources.open_source(f"builtin:{split}", data_dir)) == size
    for rec in _records(data_dir, "stage1", 50):
        # The question first, then the image (the image tokens can read what it asks).
        assert len(rec["turns"]) == 2 and rec["turns"][0][1].endswith("\n<image>")
        assert rec["turns"][0][1].count("<image>") == 1
    assert max(len(r["turns"]) for r in _records(data_dir, "stage2", 100)) >= 4
    allowed = {"count": {"1", "2", "3"}, "color": set(builtin.COLORS),
               "digit": {str(d) for d in range(10)}, "position": set(builtin.POSITIONS),
               "yes_no": {"yes", "no"}}
    test = _records(data_dir, "test")
    for rec in test:
        assert rec["answer"] in allowed[rec["question_type"]]
        assert rec["turns"][-1] == ("assistant", rec["answer"])
    types = [r["question_type"] for r in test]
    assert set(types) == set(allowed)
    yes = sum(r["answer"] == "yes" for r in test) / types.count("yes_no")
    assert 0.4 < yes < 0.6  # POPE-style: balanced yes/no


def test_question_type_subset(built):
    data_dir = built
    full = _records(data_dir, "test")
    want = [r["id"] for r in full if r["question_type"] in ("yes_no", "color")]
    sub = sources.open_source("builtin:test?question_type=yes_no,color", data_dir)
    assert [sub[i]["id"] for i in range(len(sub))] == want and 0 < len(want) < len(full)
    with pytest.raises(sources.DataError, match="holds no records"):
        sources.open_source("builtin:test?question_type=caption", data_dir)
    with pytest.raises(sources.DataError, match="unknown keys"):
        sources.open_source("builtin:test?split=x", data_dir)


def test_count_answers_match_the_pixels(built):
    data_dir = built
    src = sources.open_source("builtin:test", data_dir)
    checked = 0
    for i in range(len(src)):
        rec = src[i]
        if rec["question_type"] != "count":
            continue
        from moe_lvlm.data.image import decode

        img = np.asarray(decode(rec["image"]))
        assert img.shape == (64, 64, 3)
        cells = [img[y:y + 32, x:x + 32].max() > 100 for y in (0, 32) for x in (0, 32)]
        assert sum(cells) == int(rec["answer"])
        checked += 1
    assert checked > 50


def test_pixel_statistics_describe_the_scenes(built):
    from moe_lvlm.data.image import decode

    data_dir = built
    pixels = np.stack([np.asarray(decode(r["image"]), np.float64) / 255
                       for r in _records(data_dir, "stage3", 400)])
    np.testing.assert_allclose(pixels.mean((0, 1, 2)), builtin.PIXEL_MEAN, atol=0.01)
    np.testing.assert_allclose(pixels.std((0, 1, 2)), builtin.PIXEL_STD, atol=0.015)


def test_train_and_test_share_no_digit_image(built):
    import tensorflow_datasets as tfds

    data_dir = built
    ds = tfds.data_source("digit_scenes", data_dir=data_dir,
                          decoders={"image": tfds.decode.SkipDecoding()})

    def ids(split):
        return {int(x) for i in range(len(ds[split]))
                for x in ds[split][i]["digit_ids"].decode().split(",")}

    train = ids("stage1") | ids("stage2") | ids("stage3")
    test = ids("test")
    assert test and train and not train & test
    assert len(train | test) > 1500  # most of the 1797 sklearn digits are used


def test_split_scenes_describe_the_built_records(built):
    data_dir = built
    scenes = builtin.split_scenes("test")
    records = _records(data_dir, "test")
    assert sorted(scenes) == sorted(r["id"] for r in records)
    for rec in records:
        objs, question = scenes[rec["id"]], rec["turns"][0][1]
        by_digit = {str(o["digit"]): o for o in objs}
        named = re.search(r"the (\d)\?", question)
        if rec["question_type"] == "count":
            assert rec["answer"] == str(len(objs))
        elif rec["question_type"] == "color":
            assert rec["answer"] == by_digit[named.group(1)]["color"]
        elif rec["question_type"] == "position":
            assert rec["answer"] == builtin.POSITIONS[by_digit[named.group(1)]["cell"]]
        elif rec["question_type"] == "digit":
            where = re.search(r"at the (.+)\?", question).group(1)
            assert [str(o["digit"]) for o in objs
                    if builtin.POSITIONS[o["cell"]] == where] == [rec["answer"]]
        else:
            digit = re.search(r"Is there a (\d)", question).group(1)
            assert rec["answer"] == ("yes" if digit in by_digit else "no")


def test_tokenizer(built):
    data_dir = built
    tok = builtin.load_tokenizer(data_dir)
    assert tok.pad_id == 0 and tok.vocab_size <= builtin.VOCAB_SIZE
    assert (tok.image_token_id, tok.im_start_id, tok.im_end_id) == (4, 5, 6)
    text = "What color is the 7? Answer with a single word or phrase."
    assert tok.decode(tok.encode(text)) == text
    assert 1 not in tok.encode(text)  # no unknown pieces
    # Every word of the dataset's text is one piece (a digit is '▁' + itself: split_digits).
    words = text.replace("?", " ?").replace(".", " .").replace("7", "▁ 7").split()
    assert len(tok.encode(text)) == len(words)


def test_pipeline_on_a_mixture(built):
    data_dir = built
    cfg = base.get_base_config()
    cfg.data.update(data_dir=data_dir, system_prompt="", prefetch=0)
    tok = pipeline.load_tokenizer(cfg.data)
    it = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=8,
                                mixture="builtin:stage3@0.75;builtin:stage2@0.25")
    batch = next(it)
    assert batch["images"].shape == (8, 1, 32, 32, 3)
    assert batch["images"].any(axis=(1, 2, 3, 4)).all()
    assert ((batch["input_ids"] == tok.image_token_id).sum(1) == 16).all()
    counts = pipeline.skip_counts(it)
    assert sum(counts[r] for r in pipeline.SKIP_REASONS) == 0
    it.close()
    examples = list(pipeline.prompt_examples(cfg.data, cfg.model, tok, "builtin:test"))
    assert len(examples) == builtin.SPLIT_SIZES["test"]
    ex = examples[0]
    assert tok.decode(ex["prompt_ids"]).endswith("ASSISTANT:") and ex["image"].shape == (32, 32, 3)
    assert ex["answer"] and ex["question_type"] in builtin.QUESTION_TYPES
    assert json.dumps(ex["answer"])
