"""The path layer against a GCS API server on localhost: text, bytes, folders, the local copy of a
remote folder, upload, metrics and TensorBoard events in gs://; nothing local named `gs:`."""

import json
import os
from pathlib import Path

import pytest

from moe_lvlm import paths
from moe_lvlm.data.conversation import BadRecord
from moe_lvlm.train.reporting import MetricsWriter, read_metrics
from tests.train.test_metrics import tensorboard_scalars


def test_read_write_copy_upload(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = f"{gcs}/paths_test"
    paths.write_text(f"{root}/a/b.txt", "hello")
    assert paths.path(f"{root}/a/b.txt").read_text() == "hello"
    assert paths.join(root, "a/b.txt") == f"{root}/a/b.txt"
    local = tmp_path / "src"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "x.bin").write_bytes(bytes(range(256)))
    paths.upload(local, f"{root}/up")
    assert paths.read_bytes(f"{root}/up/sub/x.bin") == bytes(range(256))
    copy = paths.local_copy(f"{root}/up")
    assert copy.startswith(os.environ["MOE_LVLM_CACHE"])
    with open(os.path.join(copy, "sub", "x.bin"), "rb") as f:
        assert f.read() == bytes(range(256))
    assert paths.local_copy(f"{root}/up") == copy  # already there: not fetched again
    assert not (tmp_path / "gs:").exists()


def test_metrics_and_tensorboard_in_gcs(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage = f"{gcs}/metrics_test/stage1"
    writer = MetricsWriter(stage, "stage1", 3)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step, "ce": 0.5, "lr": 1e-3, "grad_norm": 1.0,
                            "layer/expert_fraction": [0.25, 0.75]})
    writer.close()
    assert [r["step"] for r in read_metrics(f"{stage}/metrics.jsonl")] == [1, 2, 3]
    # Resumed from step 2: step 3 is dropped, then written again.
    writer = MetricsWriter(stage, "stage1", 3, start_step=2)
    writer.write(3, {"loss": 9.0, "ce": 0.5, "lr": 1e-3, "grad_norm": 1.0})
    writer.close()
    lines = paths.path(f"{stage}/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == [1.0, 0.5, 9.0]
    events = [p for p in paths.path(f"{stage}/tensorboard").iterdir()]
    assert len(events) >= 1 and "tfevents" in events[0].name
    scalars = tensorboard_scalars(Path(paths.local_copy(f"{stage}/tensorboard")))
    assert scalars["stage1/loss", 1] == 1.0 and scalars["stage1/loss", 2] == 0.5
    assert scalars["stage1/loss", 3] == 9.0  # the resumed run's, written last
    assert scalars["stage1/layer/expert_fraction/1", 2] == 0.75
    assert not (tmp_path / "gs:").exists()


def test_llava_records_and_images_in_gcs(gcs):
    import io

    from PIL import Image

    from moe_lvlm.data import pipeline, sources

    root = f"{gcs}/llava_test"
    png = io.BytesIO()
    Image.new("RGB", (6, 4), (200, 30, 30)).save(png, format="PNG")
    paths.write_bytes(f"{root}/img/a.png", png.getvalue())
    row = {"id": "r0", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}
    paths.write_text(f"{root}/data.jsonl", json.dumps(row) + "\n")
    source = sources.open_source(f"llava:{root}/data.jsonl?image_root={root}/img", "")
    record = source[0]
    assert record["id"] == "r0" and record["image"] == f"{root}/img/a.png"
    image = pipeline.Encoder.load_image(record["image"])
    assert image.size == (6, 4) and image.getpixel((0, 0)) == (200, 30, 30)
    with pytest.raises(BadRecord, match="gone.png") as missing:  # a counted bad record
        pipeline.Encoder.load_image(f"{root}/img/gone.png")
    assert missing.value.reason == "missing_image"
