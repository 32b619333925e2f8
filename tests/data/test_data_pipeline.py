"""The grain pipeline: batch contract, determinism, process sharding, packing, mixtures, resume."""

import json
import re

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import base
from moe_lvlm.data import conversation, image, pipeline
from moe_lvlm.data.tokenizer import SentencePieceTokenizer

N_RECORDS = 36


def write_corpus(root, n=N_RECORDS, name="corpus.json", every_image=3, prefix="item"):
    """n LLaVA records 'item k' -> 'ok k'; every `every_image`-th has a PNG image."""
    (root / "img").mkdir(exist_ok=True)
    records = []
    rng = np.random.default_rng(0)
    for k in range(n):
        rec = {"id": f"{prefix}-{k}", "conversations": [
            {"from": "human", "value": f"{prefix} {k}"}, {"from": "gpt", "value": f"ok {k}"}]}
        if k % every_image == 0:
            file = f"{prefix}{k}.png"
            Image.fromarray(rng.integers(0, 256, (20 + k % 5, 24, 3), dtype=np.uint8)).save(
                root / "img" / file)
            rec["image"] = file
            rec["conversations"][0]["value"] = f"<image>\n{prefix} {k}"
        records.append(rec)
    path = root / name
    path.write_text(json.dumps(records))
    return f"llava:{path}?image_root={root / 'img'}", records


@pytest.fixture
def cfg(sp_model_path):
    c = base.get_base_config()
    c.data.update(tokenizer=sp_model_path, seq_len=48, system_prompt="", prefetch=0,
                  read_threads=2)
    return c


@pytest.fixture
def tok(sp_model_bytes):
    return SentencePieceTokenizer(sp_model_bytes)


def items(batch, tok, prefix="item"):
    """The record numbers in each row of a batch, in order."""
    out = []
    for row, seg in zip(batch["input_ids"], batch["segment_ids"], strict=True):
        out.append([int(k) for k in re.findall(rf"{prefix} (\d+)", tok.decode(row[seg > 0]))])
    return out


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def test_batch_contract(tmp_path, cfg, tok):
    spec, records = write_corpus(tmp_path)
    it = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=4, mixture=spec,
                                train=False)
    batch = next(it)
    n_img = 16
    assert batch["input_ids"].shape == (4, 48) and batch["input_ids"].dtype == np.int32
    assert batch["images"].shape == (4, 1, 32, 32, 3) and batch["images"].dtype == np.float32
    for r, rec in enumerate(records[:4]):
        turns = conversation.turns_from_llava(rec["conversations"])
        enc = conversation.encode(turns, "vicuna_v1", tok, n_img, system="")
        n = len(enc.ids)
        np.testing.assert_array_equal(batch["input_ids"][r, :n], enc.ids)
        np.testing.assert_array_equal(batch["input_ids"][r, n:], 0)
        np.testing.assert_array_equal(batch["targets"][r, :n - 1], enc.ids[1:])
        np.testing.assert_array_equal(batch["targets"][r, n - 1:], 0)
        np.testing.assert_array_equal(batch["loss_mask"][r, :n - 1], enc.train[1:])
        assert batch["loss_mask"][r, n - 1:].sum() == 0
        np.testing.assert_array_equal(batch["segment_ids"][r], (np.arange(48) < n).astype(int))
        np.testing.assert_array_equal(batch["positions"][r, :n], np.arange(n))
        # The answer 'ok k' and </s> are the trained targets.
        trained = batch["targets"][r][batch["loss_mask"][r] > 0]
        assert tok.decode(trained) == f"ok {r}" and trained[-1] == tok.eos_id
        if "image" in rec:
            with Image.open(tmp_path / "img" / rec["image"]) as im:
                expected = image.preprocess(im.convert("RGB"), 32, cfg.model.vision.mean,
                                            cfg.model.vision.std, "pad")
            np.testing.assert_allclose(batch["images"][r, 0], expected, atol=1e-6)
            assert (batch["input_ids"][r] == tok.image_token_id).sum() == n_img
        else:
            assert not batch["images"][r].any()
    it.close()


def test_same_seed_same_batches(tmp_path, cfg, tok):
    spec, _ = write_corpus(tmp_path)
    def make():
        return pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=4,
                                              mixture=spec)
    a, b = make(), make()
    first, second = take(a, 12), take(b, 12)  # 48 samples: past the first epoch of 36
    assert_batches_equal(first, second)
    epoch = sorted(k for bt in first[:9] for row in items(bt, tok) for k in row)
    assert epoch == list(range(N_RECORDS))  # one shuffled epoch, then the next
    assert [items(bt, tok) for bt in first[:9]] != [[[4 * i + j] for j in range(4)]
                                                    for i in range(9)]
    cfg.data.seed = 1
    other = take(make(), 3)
    assert [items(bt, tok) for bt in other] != [items(bt, tok) for bt in first[:3]]


def test_process_shards_are_disjoint_and_cover_the_epoch(tmp_path, cfg, tok):
    spec, _ = write_corpus(tmp_path)
    seen = []
    for index in range(2):
        it = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=6, mixture=spec,
                                    num_epochs=1, process_index=index, process_count=2)
        seen.append([k for bt in it for row in items(bt, tok) for k in row])
    assert len(seen[0]) == len(seen[1]) == N_RECORDS // 2
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N_RECORDS))


def _save_restore(tmp_path, make, n_before=5, n_after=6):
    """Saves `make()`'s iterator after n_before batches with orbax, restores it into a fresh one
    and checks the next n_after batches; returns the uninterrupted batches."""
    reference = make()
    uninterrupted = take(reference, n_before + n_after)
    it = make()
    take(it, n_before)
    ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    ckpt.save(tmp_path / "ckpt", args=grain.checkpoint.CheckpointSave(it))
    take(it, 2)  # moves on after the save; the restore must rewind
    fresh = make()
    ckpt.restore(tmp_path / "ckpt", args=grain.checkpoint.CheckpointRestore(fresh))
    assert_batches_equal(take(fresh, n_after), uninterrupted[n_before:])
    for x in (reference, it, fresh):
        x.close()
    return uninterrupted


@pytest.mark.parametrize("packing", [False, True])
def test_restore_mid_epoch_gives_the_next_batches(tmp_path, cfg, tok, packing):
    spec, _ = write_corpus(tmp_path)
    cfg.data.packing = packing
    cfg.data.prefetch = 2
    _save_restore(tmp_path, lambda: pipeline.make_iterator(
        cfg.data, cfg.model, tok, global_batch_size=2, mixture=spec))


def test_worker_process_matches_inline_and_restores(tmp_path, cfg, tok):
    spec, _ = write_corpus(tmp_path)
    def make():
        return pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=4,
                                              mixture=spec)
    inline = take(make(), 6)
    cfg.data.num_workers = 1
    assert_batches_equal(_save_restore(tmp_path, make, n_before=3, n_after=3), inline)


def count_encodes(monkeypatch, tok) -> list:
    """The ids of the records this test's encoders (those of tokenizer `tok`) encode, in order.
    An earlier test's iterator may still read ahead in a thread of its own: not counted."""
    calls = []
    encode = pipeline.Encoder.encode

    def counted(self, record):
        if self.tokenizer is tok:
            calls.append(record["id"])
        return encode(self, record)

    monkeypatch.setattr(pipeline.Encoder, "encode", counted)
    return calls


def test_cache_encoded_same_batches_each_record_encoded_once(tmp_path, cfg, tok, monkeypatch):
    spec_a, _ = write_corpus(tmp_path)
    spec_b, _ = write_corpus(tmp_path, n=10, name="other.json", prefix="thing")
    mixture = f"{spec_a}@0.7;{spec_b}@0.3"
    calls = count_encodes(monkeypatch, tok)

    def make():
        return pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=4,
                                      mixture=mixture)

    def run():
        calls.clear()
        it = make()
        batches = take(it, 30)  # 120 samples: several epochs of both sources
        it.close()
        return batches

    cfg.data.update(cache_encoded=True, read_threads=1)  # (two threads may race to a record)
    cached = run()
    assert sorted(calls) == sorted(set(calls)) and len(calls) <= N_RECORDS + 10
    assert_batches_equal(_save_restore(tmp_path, make, n_before=12, n_after=18), cached)
    cfg.data.update(cache_encoded=False, read_threads=2)
    assert_batches_equal(run(), cached)
    assert len(calls) >= 120  # and a few read ahead


def test_encoded_cache_shared_by_stages_of_another_seq_len(tmp_path, cfg, tok, monkeypatch):
    """Two stages of one run share the encoded records of a source; the second, with a shorter
    seq_len, cuts them itself: no record encoded again, the same batches and counts as alone."""
    spec, _ = write_corpus(tmp_path)  # 44 tokens with an image, else 28
    calls = count_encodes(monkeypatch, tok)
    cfg.data.update(cache_encoded=True, read_threads=0, truncate=True)  # no read-ahead thread
    shared = pipeline.EncodedCache()

    def run(seq_len, cache, n):
        cfg.data.seq_len = seq_len
        it = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=4, mixture=spec,
                                    encoded_cache=cache)
        batches, counts = take(it, n), pipeline.skip_counts(it)
        it.close()
        return batches, counts

    run(48, shared, 12)  # 48 samples: every record once at least
    assert sorted(set(calls)) == sorted(calls) and len(calls) == N_RECORDS
    calls.clear()
    second, counts = run(42, shared, 12)
    assert calls == []
    alone, alone_counts = run(42, None, 12)
    assert len(calls) >= N_RECORDS
    assert_batches_equal(second, alone)
    assert counts == alone_counts and counts["truncated"] > 0
    assert second[0]["input_ids"].shape == (4, 42)


def test_packing(tmp_path, cfg, tok):
    spec, records = write_corpus(tmp_path, every_image=2)  # 44 tokens with an image, else 28
    cfg.data.update(packing=True, max_images_per_row=2, seq_len=128)
    it = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=2, mixture=spec,
                                train=False)
    batches = list(it)
    order = [k for bt in batches for row in items(bt, tok) for k in row]
    assert order == list(range(N_RECORDS))  # in order, each once
    assert max(bt["segment_ids"].max() for bt in batches) > 1
    for bt in batches:
        for r in range(2):
            seg, pos = bt["segment_ids"][r], bt["positions"][r]
            ks = items(bt, tok)[r]
            for j, k in enumerate(ks):
                where = np.flatnonzero(seg == j + 1)
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                assert bt["targets"][r, where[-1]] == 0 and bt["loss_mask"][r, where[-1]] == 0
                trained = bt["targets"][r][where][bt["loss_mask"][r][where] > 0]
                assert tok.decode(trained) == f"ok {k}"
            with_image = [k for k in ks if "image" in records[k]]
            assert (bt["input_ids"][r] == tok.image_token_id).sum() == 16 * len(with_image)
            for m, k in enumerate(with_image):
                with Image.open(tmp_path / "img" / records[k]["image"]) as im:
                    expected = image.preprocess(im.convert("RGB"), 32, cfg.model.vision.mean,
                                                cfg.model.vision.std, "pad")
                np.testing.assert_allclose(bt["images"][r, m], expected, atol=1e-6)
            assert not bt["images"][r, len(with_image):].any()
    assert max(bt["images"].any(axis=(2, 3, 4)).sum(1).max() for bt in batches) == 2


def test_mixture_weights(tmp_path, cfg, tok):
    spec_a, _ = write_corpus(tmp_path, n=200, name="a.json", every_image=1000, prefix="item")
    spec_b, _ = write_corpus(tmp_path, n=200, name="b.json", every_image=1000, prefix="ok")
    it = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=8,
                                mixture=f"{spec_a}@3;{spec_b}@1")
    from_a = [len(row) for bt in take(it, 20) for row in items(bt, tok)]
    assert sum(from_a) == 120  # exactly 3 of every 4 samples come from the first source


def test_eval_pads_the_last_batch(tmp_path, cfg, tok):
    spec, _ = write_corpus(tmp_path, n=10)
    batches = list(pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=4,
                                          mixture=spec, train=False))
    assert len(batches) == 3
    assert [k for bt in batches for row in items(bt, tok) for k in row] == list(range(10))
    assert not batches[-1]["segment_ids"][2:].any()


def test_global_arrays_on_the_mesh(tmp_path, cfg, tok):
    from moe_lvlm.parallel.mesh import make_mesh

    spec, _ = write_corpus(tmp_path, n=8)
    mesh = make_mesh((jax.device_count(), 1, 1, 1))
    it = pipeline.make_iterator(cfg.data, cfg.model, tok, mesh, global_batch_size=4,
                                mixture=spec, train=False)
    batch = next(it)
    assert isinstance(batch["input_ids"], jax.Array)
    assert batch["input_ids"].sharding.spec == jax.sharding.PartitionSpec(
        ("data", "fsdp", "expert"))
    assert batch["images"].shape == (4, 1, 32, 32, 3)
    it.close()


def test_position_rebuilt_from_the_step_for_another_process_count(tmp_path, cfg, tok):
    """2 processes read 3 steps of global batch 4; 1 process started at record 3 x 4 then reads,
    step by step, the records that the 2 processes would have read together (no packing, no bad
    records: one record a row), and together they never repeat a record within the epoch."""
    spec, _ = write_corpus(tmp_path)

    def make(index, count, start_record=0):
        return pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=4,
                                      mixture=spec, process_index=index, process_count=count,
                                      start_record=start_record)

    two = [take(make(p, 2), 6) for p in (0, 1)]  # 6 steps of 2 rows on each process
    want = [sorted(k for p in (0, 1) for row in items(two[p][s], tok) for k in row)
            for s in range(6)]
    resumed = take(make(0, 1, start_record=3 * 4), 3)
    got = [sorted(k for row in items(b, tok) for k in row) for b in resumed]
    assert got == want[3:]
    seen = [k for s in want[:3] for k in s] + [k for s in got for k in s]
    assert len(seen) == len(set(seen)) == 24
