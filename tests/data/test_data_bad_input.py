"""Bad records: counted by reason and skipped (default), or rejected naming the record (strict)."""

import json

import numpy as np
import pytest
from PIL import Image

from configs import base
from moe_lvlm.data import pipeline
from moe_lvlm.data.tokenizer import SentencePieceTokenizer

LONG = " ".join(["item"] * 60)


def _conv(q, a="ok"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def write_bad_corpus(root):
    """A JSONL corpus with every kind of bad record; returns (spec, {id or line: reason})."""
    img = root / "img"
    img.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img / "good.png")
    (img / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    png = (img / "good.png").read_bytes()
    (img / "cut.png").write_bytes(png[: len(png) // 2])
    lines = [
        json.dumps({"id": "good-image", "image": "good.png",
                    "conversations": _conv("<image>\nhi")}),
        json.dumps({"id": "good-text", "conversations": _conv("hi")}),
        json.dumps({"id": "long-text", "conversations": _conv("hi", LONG)}),
        json.dumps({"id": "missing", "image": "nope.png", "conversations": _conv("<image>\nhi")}),
        json.dumps({"id": "corrupt", "image": "garbage.jpg", "conversations": _conv("<image>\nx")}),
        json.dumps({"id": "truncated-png", "image": "cut.png", "conversations": _conv("<image>")}),
        '{"id": "broken", "conversations": [',
        json.dumps({"id": "no-conversations", "image": "good.png"}),
        json.dumps({"id": "two-humans", "conversations": _conv("a") [:1] * 2}),
        json.dumps({"id": "image-no-placeholder", "image": "good.png",
                    "conversations": _conv("a")}),
        json.dumps({"id": "placeholder-no-image", "conversations": _conv("<image>\nwhat?")}),
        json.dumps({"id": "image-too-late", "image": "good.png",
                    "conversations": _conv(f"{LONG} <image>")}),
    ]
    path = root / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    expected = {
        "missing": "missing_image", "corrupt": "corrupt_image", "truncated-png": "corrupt_image",
        "bad.jsonl:7": "malformed_record", "no-conversations": "malformed_record",
        "two-humans": "not_alternating", "image-no-placeholder": "image_without_placeholder",
        "placeholder-no-image": "placeholder_without_image", "image-too-late": "too_long",
    }
    return f"llava:{path}?image_root={img}", expected


@pytest.fixture
def cfg(sp_model_path):
    c = base.get_base_config()
    c.data.update(tokenizer=sp_model_path, seq_len=48, system_prompt="", prefetch=0)
    return c


@pytest.fixture
def tok(sp_model_bytes):
    return SentencePieceTokenizer(sp_model_bytes)


def _run(cfg, tok, spec, **kw):
    it = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=2, mixture=spec,
                                train=False, **kw)
    batches = list(it)
    return batches, pipeline.skip_counts(it)


def test_skips_are_counted_by_reason(tmp_path, cfg, tok):
    spec, expected = write_bad_corpus(tmp_path)
    batches, counts = _run(cfg, tok, spec)
    want = dict.fromkeys(pipeline.COUNTERS, 0)
    for reason in expected.values():
        want[reason] += 1
    want["truncated"] = 1  # long-text: cut to seq_len, kept
    assert counts == want
    rows = np.concatenate([b["segment_ids"].max(1) for b in batches])
    assert rows.sum() == 3  # good-image, good-text, long-text
    assert len(batches) == 2


def test_too_long_is_skipped_without_truncation(tmp_path, cfg, tok):
    spec, _ = write_bad_corpus(tmp_path)
    cfg.data.truncate = False
    _, counts = _run(cfg, tok, spec)
    assert counts["too_long"] == 2 and counts["truncated"] == 0


def test_counts_survive_a_checkpoint(tmp_path, cfg, tok):
    spec, _ = write_bad_corpus(tmp_path)
    it = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=1, mixture=spec,
                                train=False)
    next(it)
    next(it)
    state = it.get_state()
    it2 = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=1, mixture=spec,
                                 train=False)
    it2.set_state(json.loads(json.dumps(state)))
    assert pipeline.skip_counts(it2) == pipeline.skip_counts(it)
    list(it2)
    assert sum(pipeline.skip_counts(it2).values()) == 10


def test_strict_mode_names_the_record_and_problem(tmp_path, cfg, tok):
    spec, expected = write_bad_corpus(tmp_path)
    path = spec.split(":", 1)[1].split("?")[0]
    lines = open(path).read().splitlines()
    cfg.data.bad_records = "strict"
    messages = {
        "missing": "cannot read image", "corrupt": "cannot decode image",
        "truncated-png": "cannot decode image", "bad.jsonl:7": "line 7: bad JSON",
        "no-conversations": "'conversations' must be a non-empty list",
        "two-humans": "turn 1 is from 'human', expected the assistant",
        "image-no-placeholder": "has an image but no <image>",
        "placeholder-no-image": "has <image> in its text but no image",
        "image-too-late": "image tokens end at",
    }
    checked = 0
    for line_no, line in enumerate(lines, start=1):
        key = json.loads(line)["id"] if line.endswith("}") else f"bad.jsonl:{line_no}"
        if key not in expected:
            continue
        single = tmp_path / f"single{line_no}.jsonl"
        single.write_text(lines[0] + "\n" + "\n" * (line_no - 2) + line + "\n")
        one = spec.replace(path, str(single))
        with pytest.raises(pipeline.DataError) as e:
            _run(cfg, tok, one)
        msg = str(e.value)
        key = key.replace("bad.jsonl", single.name)
        assert f"record '{key}'" in msg and expected[key.replace(single.name, "bad.jsonl")] in msg
        assert messages[key.replace(single.name, "bad.jsonl")] in msg, msg
        checked += 1
    assert checked == len(expected)


def test_whole_file_errors_name_the_file(tmp_path):
    from moe_lvlm.data.sources import LlavaJsonSource

    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1}')
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        LlavaJsonSource(str(bad))
    bad.write_text('{"id": 1}')
    with pytest.raises(ValueError, match="must hold a JSON array"):
        LlavaJsonSource(str(bad))
