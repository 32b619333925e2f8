"""`python -m moe_lvlm.analyze_routing` on a workdir holding a random MoE model with MoE layers in
the vision tower, the projector and both decoder blocks: its numbers against the router choices
of the numpy reference model (tests/models/np_reference.py) on the same inputs, counted here."""

import collections
import json

import numpy as np
import pytest

from configs import demo
from moe_lvlm import analyze_routing
from moe_lvlm.train import stages as stages_lib
from moe_lvlm.train.checkpoint import StageCheckpoints
from moe_lvlm.train.loop import stage_names
from moe_lvlm.workdir import load_trained
from tests.generate.tiny_workdir import init_params, tiny_model_config, tiny_tokenizer
from tests.models import np_reference as ref

LIMIT, BATCH = 6, 4
LAYERS = ("vision/layers_0", "projector", "decoder/layers_0", "decoder/layers_1")  # call order


def routing_workdir(root, data_dir, moe=True):
    """config.json and a stage3 checkpoint of a random co-upcycled model reading `data_dir` (with
    `moe=False`, of a dense model)."""
    root.mkdir(parents=True)
    tokenizer = tiny_tokenizer()
    tokenizer.save(str(root / "tokenizer.model"))
    cfg = demo.get_config()
    cfg.model = tiny_model_config()
    cfg.model.decoder.moe_layers = "all" if moe else "none"
    cfg.model.vision.moe_layers = "0" if moe else "none"
    cfg.model.projector.moe = moe
    cfg.data.update(tokenizer=str(root / "tokenizer.model"), data_dir=data_dir)
    workdir = root / "workdir"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    names = stage_names(cfg)
    model_cfg = stages_lib.stage_model_config(cfg, names, names.index("stage3"))
    model_cfg.image_token_id = tokenizer.image_token_id
    _, params = init_params(model_cfg)
    ckpt = StageCheckpoints(workdir / "stage3" / "checkpoints", max_to_keep=1, async_save=False)
    ckpt.save(3, {"params": params}, None, cfg)
    ckpt.manager.close()
    return workdir


def reference_counts(trained, monkeypatch):
    """Per layer and group, routed pairs per expert, and per modality the top-1 path counts, from
    the numpy model's router choices on the records the command reads."""
    recorded = []
    route = ref.route

    def recording_route(logits, k, noise=None, combine="renorm_chosen"):
        out = route(logits, k, noise, combine)
        recorded.append(out[0])
        return out

    monkeypatch.setattr(ref, "route", recording_route)
    num_experts = trained.model_config.moe.num_experts
    pairs = collections.defaultdict(lambda: np.zeros(num_experts, np.int64))
    paths = collections.defaultdict(collections.Counter)
    image_id = trained.model_config.image_token_id
    for batch, kinds in analyze_routing.batches(trained, "builtin:test", LIMIT, BATCH):
        recorded.clear()
        ref.lvlm(trained.params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                 batch["images"], trained.model_config)
        ids = dict(zip(LAYERS, recorded, strict=True))
        for row, kind in enumerate(kinds):
            for s in range(batch["input_ids"].shape[1]):
                if batch["segment_ids"][row, s] == 0:
                    continue
                modality = "image" if batch["input_ids"][row, s] == image_id else "text"
                for layer in LAYERS[2:]:
                    for e in ids[layer][row, s]:
                        pairs[layer, modality][e] += 1
                        pairs[layer, f"question_type/{kind}"][e] += 1
                paths[modality][tuple(int(ids[layer][row, s, 0]) for layer in LAYERS[2:])] += 1
            for layer in LAYERS[:2]:  # one image per row; every token of it
                for e in ids[layer][row].reshape(-1):
                    pairs[layer, "image"][e] += 1
    return pairs, paths


@pytest.mark.slow
def test_routing_analysis_matches_numpy_routing(tmp_path, data_dir, monkeypatch):
    workdir = routing_workdir(tmp_path / "root", data_dir)
    out = tmp_path / "routing"
    analyze_routing.main([f"--workdir={workdir}", f"--out={out}", "--split=test",
                          f"--limit={LIMIT}", f"--batch_size={BATCH}"])
    saved = json.loads((out / "routing.json").read_text())
    for name in ("expert_load.png", "question_types.png", "paths.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["records"] == LIMIT and (saved["stage"], saved["step"]) == ("stage3", 3)
    assert set(saved["layers"]) == set(LAYERS)

    pairs, paths = reference_counts(load_trained(workdir), monkeypatch)
    kinds = {g for _, g in pairs if g.startswith("question_type/")}
    assert len(kinds) > 1  # the records span several question types
    for (layer, group), counts in pairs.items():
        got = saved["layers"][layer]["expert_fraction"][group]
        np.testing.assert_allclose(got, counts / counts.sum(), rtol=1e-12, err_msg=(layer, group))
        assert saved["layers"][layer]["pairs"][group] == counts.sum()
    for layer in LAYERS[2:]:
        assert set(saved["layers"][layer]["expert_fraction"]) == {"all", "image", "text", *kinds}
    assert saved["tokens"] == {m: sum(c.values()) for m, c in paths.items()}
    for modality, counter in paths.items():
        total = sum(counter.values())
        top = saved["top1_paths"][modality]
        assert len(top) == min(analyze_routing.TOP_PATHS, len(counter))
        for entry in top:
            assert entry["fraction"] == pytest.approx(counter[tuple(entry["path"])] / total)
        listed = {tuple(e["path"]) for e in top}
        unlisted = [n for p, n in counter.items() if p not in listed]
        assert not unlisted or max(unlisted) / total <= min(e["fraction"] for e in top)


def test_dense_model_has_nothing_to_analyse(tmp_path, capsys):
    """The dense point of a sweep: a note and an empty routing.json, not an error."""
    workdir = routing_workdir(tmp_path / "root", str(tmp_path / "no_data"), moe=False)
    analyze_routing.main([f"--workdir={workdir}", f"--out={tmp_path / 'routing'}"])
    assert "has no MoE layer" in capsys.readouterr().out
    saved = json.loads((tmp_path / "routing" / "routing.json").read_text())
    assert saved["layers"] == {} and saved["stage"] == "stage3"
