"""docs/reliability.md, data rows: a pipeline that cannot give a batch stops with an error naming
the source, the skips by reason and the first records (it never spins); empty, `[]` and
non-UTF-8 files are errors naming the file; a non-UTF-8 JSONL line is one skipped record."""

import json
import threading

import numpy as np
import pytest
from PIL import Image

from moe_lvlm.cli import UserError
from moe_lvlm.data import pipeline, sources
from tests.data.test_data_bad_input import _conv, cfg, tok  # noqa: F401  (fixtures)


def _train_iterator(cfg, tok, spec, batch=2):  # noqa: F811
    return pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=batch,
                                  mixture=spec, train=True)


def _next_within(iterator, seconds=60):
    """next(iterator) in a thread: a hang fails the test instead of blocking CI."""
    out = {}

    def target():
        try:
            out["value"] = next(iterator)
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"next() did not return within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _records(root, n, image="nope.png"):
    path = root / "data.json"
    path.write_text(json.dumps([{"id": f"r{i}", "image": image,
                                 "conversations": _conv("<image>\nhi")} for i in range(n)]))
    return path


def test_every_record_skipped_stops_with_the_reasons(tmp_path, cfg, tok):  # noqa: F811
    """A wrong image_root: every record is a missing image, repeated forever."""
    path = _records(tmp_path, 7)
    cfg.data.max_consecutive_skips = 50
    spec = f"llava:{path}?image_root={tmp_path}"
    with pytest.raises(pipeline.DataError) as e:
        _next_within(_train_iterator(cfg, tok, spec))
    message = str(e.value)
    assert isinstance(e.value, UserError)
    assert f"50 records in a row were skipped and none was usable (source: {path})" in message
    assert "{'missing_image': 50}" in message
    assert "first records: ['r" in message and "data.max_consecutive_skips=50" in message


def test_rows_too_short_for_any_record_stop_too(tmp_path, cfg, tok):  # noqa: F811
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    path = _records(tmp_path, 3, image="a.png")
    cfg.data.update(max_consecutive_skips=20, truncate=False, seq_len=20)
    with pytest.raises(pipeline.DataError, match=r"\{'too_long': 20\}"):
        _next_within(_train_iterator(cfg, tok, f"llava:{path}?image_root={tmp_path}"))


def test_a_few_good_records_among_bad_ones_train_on(tmp_path, cfg, tok):  # noqa: F811
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    records = [{"id": f"bad{i}", "image": "nope.png", "conversations": _conv("<image>\nhi")}
               for i in range(30)]
    records.append({"id": "good", "image": "a.png", "conversations": _conv("<image>\nhi")})
    (tmp_path / "d.json").write_text(json.dumps(records))
    cfg.data.max_consecutive_skips = 100  # more than the 30 bad records between good ones
    batch = _next_within(_train_iterator(cfg, tok, f"llava:{tmp_path / 'd.json'}"
                                                   f"?image_root={tmp_path}"))
    assert batch["input_ids"].shape[0] == 2


@pytest.mark.parametrize("name, content, message", [
    ("empty.json", b"", "is not valid JSON"),
    ("array.json", b"[]", "holds no records"),
    ("empty.jsonl", b"\n\n", "holds no records"),
    ("latin1.json", '[{"id": "caf\xe9"}]'.encode("latin-1"), r"is not UTF-8 text \(byte 12"),
])
def test_unusable_file_is_an_error_naming_it(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(sources.DataError, match=message) as e:
        sources.open_source(f"llava:{path}", "")
    assert str(path) in str(e.value)


def test_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(sources.DataError, match=f"cannot read {tmp_path}/nope.json"):
        sources.open_source(f"llava:{tmp_path}/nope.json", "")


def test_non_utf8_jsonl_line_is_one_skipped_record(tmp_path, cfg, tok):  # noqa: F811
    good = json.dumps({"id": "good", "conversations": _conv("hi")}).encode()
    bad = '{"id": "caf\xe9", "conversations": []}'.encode("latin-1")
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([good, bad, good]) + b"\n")
    source = sources.open_source(f"llava:{path}", "")
    assert source[1]["bad"] == "malformed_record" and "line 2: not UTF-8" in source[1]["message"]
    it = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=2,
                                mixture=f"llava:{path}", train=False)
    batches = list(it)
    assert sum(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in batches) == 2
    assert pipeline.skip_counts(it)["malformed_record"] == 1
