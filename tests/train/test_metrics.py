"""What the reference run (tests/train/conftest.py) logs: metrics.jsonl, TensorBoard events and
console lines every step, expert load and dropped fraction per MoE layer in stage III, the loss
and lr values the formulas give, and a PNG per stage at its end."""

import json
import math
import struct

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from tests.train.conftest import STEPS

STAGES = ("stage1", "stage2", "stage3")
PEAK_LR = {"stage1": 2e-3, "stage2": 1e-3, "stage3": 1e-3}  # configs/demo.py
EVERY_STEP = ("loss", "ce", "balance_loss", "z_loss", "grad_norm", "lr", "step_time",
              "tokens_per_s", "loss_tokens", "nonfinite_steps", "skipped_records")
ROWS = {"stage1": (4, 96), "stage2": (4, 96), "stage3": (4, 64)}  # batch, seq_len (conftest)
MOE_LAYER = "moe/decoder/layers_0"  # the 2-block decoder's only MoE block


def records(workdir, stage):
    return [json.loads(x) for x in (workdir / stage / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(directory) -> dict[tuple[str, int], float]:
    """(tag, step) -> value, read from the TFRecord event files with the Event proto."""
    out = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4  # length, its crc, the event, its crc
            for v in event.summary.value:
                out[v.tag, event.step] = v.simple_value
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_jsonl_has_every_step_and_metric(reference_run, stage):
    rs = records(reference_run, stage)
    assert [r["step"] for r in rs] == list(range(1, STEPS + 1))
    for r in rs:
        assert r["stage"] == stage
        assert set(EVERY_STEP) <= set(r), set(EVERY_STEP) - set(r)
        assert all(math.isfinite(r[k]) for k in EVERY_STEP)
        assert r["nonfinite_steps"] == 0 and r["loss_tokens"] > 0 and r["tokens_per_s"] > 0
    has_moe = any(k.startswith("moe/") for k in rs[0])
    assert has_moe == (stage == "stage3")


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_trains_on_rows_of_its_own_length(reference_run, stage):
    batch, seq_len = ROWS[stage]
    for r in records(reference_run, stage):  # logged every step: tokens per step = rows x length
        assert r["tokens_per_s"] * r["step_time"] == pytest.approx(batch * seq_len, rel=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_lr_follows_warmup_then_cosine(reference_run, stage):
    # 4 steps, warmup round(0.03 * 4) -> 1 step: lr(t) = peak * (1 + cos(pi * (t - 1) / 3)) / 2
    peak = PEAK_LR[stage]
    want = [0.0] + [peak * (1 + math.cos(math.pi * (t - 1) / 3)) / 2 for t in (1, 2, 3)]
    got = [r["lr"] for r in records(reference_run, stage)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_stage3_logs_expert_load_and_drops_per_moe_layer(reference_run):
    for r in records(reference_run, "stage3"):
        fraction = r[f"{MOE_LAYER}/expert_fraction"]
        assert len(fraction) == 4 and min(fraction) >= 0
        assert sum(fraction) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= r[f"{MOE_LAYER}/dropped_fraction"] < 1.0
        assert 0.0 < r[f"{MOE_LAYER}/router_entropy"] <= math.log(4) + 1e-6
        # configs/demo.py: balance coefficient 0.01, no z-loss
        assert r["loss"] == pytest.approx(r["ce"] + 0.01 * r["balance_loss"], rel=1e-6)
    assert not any(k.startswith("moe/") for k in records(reference_run, "stage2")[0])


@pytest.mark.parametrize("stage", ("stage1", "stage3"))
def test_tensorboard_events_hold_the_jsonl_values(reference_run, stage):
    scalars = tensorboard_scalars(reference_run / stage / "tensorboard")
    for r in records(reference_run, stage):
        for key in ("loss", "ce", "lr", "grad_norm"):
            assert scalars[f"{stage}/{key}", r["step"]] == pytest.approx(r[key], rel=1e-6)
        if stage == "stage3":
            for e, value in enumerate(r[f"{MOE_LAYER}/expert_fraction"]):
                tag = f"stage3/{MOE_LAYER}/expert_fraction/{e}"
                assert scalars[tag, r["step"]] == pytest.approx(value, rel=1e-6, abs=1e-7)


def test_console_prints_a_progress_line_per_step(reference_run):
    out = (reference_run.parent / "stdout.txt").read_text()
    for stage in STAGES:
        lines = [x for x in out.splitlines() if x.startswith(f"{stage} [")]
        assert [x.split("]")[1].split()[0] for x in lines] == [f"{t}/{STEPS}" for t in
                                                              range(1, STEPS + 1)]
        assert all("loss " in x and "tok/s" in x for x in lines)


def test_each_stage_ends_with_a_plot(reference_run):
    widths = {}
    for stage in STAGES:
        with Image.open(reference_run / stage / "training.png") as image:
            assert image.format == "PNG"
            widths[stage] = image.size[0]
    # Stage III adds the expert-load panel next to the loss curve.
    assert widths["stage3"] > 1.5 * widths["stage1"]
    assert widths["stage1"] == widths["stage2"]
