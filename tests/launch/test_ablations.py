"""configs/ablations/*.py and the sweep runner launch/sweep.py: every sweep point validates and
builds the model it names, the runner's commands and table, and a 2-point sweep end to end."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import pytest
from flax import traverse_util

from configs.ablations import common
from launch import sweep
from moe_lvlm.config import ConfigError, validate
from moe_lvlm.data import builtin
from moe_lvlm.models.lvlm import build_model
from moe_lvlm.train import loop
from moe_lvlm.train import stages as stages_lib
from moe_lvlm.train.stages import stage_model

ROOT = Path(__file__).resolve().parents[2]
ABLATIONS = ROOT / "configs" / "ablations"
# Hand-written expectations for the tiny model's 4 decoder layers (d=128, SwiGLU f=256).
SWEEPS = {
    "experts": ("num_experts", (1, 2, 4, 8)),
    "top_k": ("top_k", (1, 2)),
    "placement": ("moe_layers", ("every_other", "all", "first_half", "second_half")),
    "dispatch": ("dispatch", ("dropless", "capacity")),
}
MOE_LAYERS = {"every_other": [0, 2], "all": [0, 1, 2, 3], "first_half": [0, 1],
              "second_half": [2, 3]}
EXPERT_PARAMS = 3 * 128 * 256  # gate, up, down of one expert
ROUTER_PARAMS = 128  # per expert


def stage3_params(cfg) -> dict[str, tuple[int, ...]]:
    """Parameter path -> shape of the model that the last stage trains."""
    names = loop.stage_names(cfg)
    model_cfg = stage_model(cfg, names, names[-1])
    model_cfg.image_token_id = 3
    shapes = jax.eval_shape(
        lambda r: build_model(model_cfg).init(r, *loop.example_inputs(model_cfg, 1, 8, 1)),
        jax.random.PRNGKey(0))
    flat = traverse_util.flatten_dict(nn.meta.unbox(shapes)["params"], sep="/")
    return {path: leaf.shape for path, leaf in flat.items()}


def expected_settings(axis: str, value) -> tuple[int, int, str, list[int]]:
    """(experts, top_k, dispatch, MoE layers) that a sweep point must produce."""
    experts, top_k, dispatch, layers = 4, 2, "dropless", MOE_LAYERS["every_other"]
    if axis == "num_experts":
        experts, top_k, layers = value, (1 if value == 1 else 2), ([] if value == 1 else layers)
    elif axis == "top_k":
        top_k = value
    elif axis == "moe_layers":
        layers = MOE_LAYERS[value]
    else:
        dispatch = value
    return experts, top_k, dispatch, layers


def test_each_file_declares_its_sweep():
    for name, (axis, values) in SWEEPS.items():
        assert sweep.load_sweep(ABLATIONS / f"{name}.py") == (axis, values)


@pytest.mark.parametrize("name,axis,value", [
    (name, axis, value) for name, (axis, values) in SWEEPS.items() for value in values])
def test_sweep_point_validates_and_builds_its_model(name, axis, value):
    module = sweep.load_sweep_module(ABLATIONS / f"{name}.py")
    cfg = module.get_config(f"{axis}={value}")
    validate(cfg, 1)
    experts, top_k, dispatch, layers = expected_settings(axis, value)
    moe = cfg.model.moe
    assert (moe.num_experts, moe.top_k, moe.dispatch) == (experts, top_k, dispatch)
    params = stage3_params(cfg)
    moe_at = sorted({int(p.split("/")[1][len("layers_"):]) for p in params
                     if p.startswith("decoder/") and "/moe/" in p})
    dense_at = sorted({int(p.split("/")[1][len("layers_"):]) for p in params
                       if p.startswith("decoder/") and "/mlp/" in p})
    assert moe_at == layers
    assert dense_at == sorted(set(range(4)) - set(layers))
    for i in layers:
        assert params[f"decoder/layers_{i}/moe/experts/gate"] == (experts, 128, 256)
        assert params[f"decoder/layers_{i}/moe/router"] == (128, experts)


@pytest.mark.parametrize("value", ["softmax", "renorm_chosen", "renorm_kept"])
def test_combine_weights_sweep(value):
    module = sweep.load_sweep_module(ABLATIONS / "combine_weights.py")
    assert (module.AXIS, module.VALUES) == ("combine_weights", ("softmax", "renorm_chosen",
                                                               "renorm_kept"))
    cfg = module.get_config(f"combine_weights={value}")
    validate(cfg, 1)
    moe = cfg.model.moe
    # Capacity dispatch by default: with drops, renorm_kept and renorm_chosen differ.
    assert (moe.combine_weights, moe.top_k, moe.dispatch) == (value, 2, "capacity")
    if value != "softmax":
        with pytest.raises(ConfigError, match="top_k=1"):
            validate(module.get_config(f"combine_weights={value},top_k=1"), 1)


# recipe -> (stages run, each one's source stage, whether each trains the MoE model)
RECIPES = {
    "full": (["stage1", "stage2", "stage3"], [None, "stage1", "stage2"], [False, False, True]),
    "no_stage1": (["stage2", "stage3"], [None, "stage2"], [False, True]),
    "no_stage2": (["stage1", "stage3"], [None, "stage1"], [False, True]),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_stage_ablation_sweep(recipe):
    module = sweep.load_sweep_module(ABLATIONS / "stages.py")
    assert (module.AXIS, module.VALUES) == ("recipe", ("full", "no_stage1", "no_stage2"))
    cfg = module.get_config(f"recipe={recipe}")
    validate(cfg, 1)
    names, sources, moe = RECIPES[recipe]
    assert loop.stage_names(cfg) == names
    assert [stages_lib.source_stage(cfg, names, n) for n in names] == sources
    assert [stages_lib.is_upcycled(cfg, names, n) for n in names] == moe
    assert stage3_params(cfg)["decoder/layers_0/moe/router"] == (128, 4)


def test_pod_scale_and_step_scaling():
    cfg = common.ablation_config("num_experts=8,scale=pod,steps=0.5")
    assert (cfg.model.decoder.embed_dim, cfg.model.decoder.num_layers) == (2048, 24)
    assert cfg.model.moe.num_experts == 8
    # MoE-LLaVA's stage steps (2180, 7530, 5200) halved.
    assert [cfg[s].num_steps for s in ("stage1", "stage2", "stage3")] == [1090, 3765, 2600]
    demo = common.ablation_config("steps=0.1")  # the sweeps: (50, 800, 1200) x 0.1
    assert [demo[s].num_steps for s in ("stage1", "stage2", "stage3")] == [5, 80, 120]


@pytest.mark.parametrize("arg,message", [
    ("num_experts=0", "num_experts=0"), ("scale=huge", "scale='huge'"),
    ("layers=all", "unknown config argument 'layers'"), ("top_k=3,num_experts=2", "top_k=3"),
    ("recipe=no_stage3", "recipe='no_stage3'")])
def test_bad_arguments_say_what_is_wrong(arg, message):
    with pytest.raises(ConfigError, match=message):
        validate(common.ablation_config(arg), 1)


def test_param_counts_of_the_table():
    counts = {e: sweep.param_counts(common.ablation_config(f"num_experts={e}").to_dict())
              for e in (1, 2, 4, 8)}
    dense = counts[1]["total_params"]
    assert counts[1]["active_params"] == dense
    for e in (2, 4, 8):  # two MoE layers, each E experts instead of one FFN, plus a router
        assert counts[e]["total_params"] == dense + 2 * (EXPERT_PARAMS * (e - 1)
                                                         + ROUTER_PARAMS * e)
        # top-2: E - 2 experts of each MoE layer idle per token
        assert counts[e]["active_params"] == counts[e]["total_params"] - 2 * EXPERT_PARAMS * (
            e - 2)


def test_dry_run_prints_each_point(capsys):
    rc = sweep.main(["configs/ablations/top_k.py", "--workdir=gs://bucket/abl",
                     "--config-args=steps=0.1", "--eval-args=--limit=50", "--dry-run", "--",
                     "--config.data.data_dir=/d"])
    assert rc == 0
    assert capsys.readouterr().out.splitlines() == [
        "python -m moe_lvlm.train --config=configs/ablations/top_k.py:top_k=1,steps=0.1 "
        "--workdir=gs://bucket/abl/top_k_1 --config.data.data_dir=/d",
        "python -m moe_lvlm.evaluate --workdir=gs://bucket/abl/top_k_1 --limit=50",
        "python -m moe_lvlm.train --config=configs/ablations/top_k.py:top_k=2,steps=0.1 "
        "--workdir=gs://bucket/abl/top_k_2 --config.data.data_dir=/d",
        "python -m moe_lvlm.evaluate --workdir=gs://bucket/abl/top_k_2 --limit=50",
    ]


def test_unknown_values_and_files_are_rejected():
    with pytest.raises(ValueError, match=r"--values \['3'\] not in"):
        sweep.parse_values("1,3", (1, 2))
    with pytest.raises(ValueError, match="no AXIS and VALUES"):
        sweep.load_sweep(ROOT / "configs" / "demo.py")


def fake_workdir(path: Path, losses, with_eval: bool) -> None:
    """A trained workdir as moe_lvlm.train leaves it: config, last-stage metrics, eval summary."""
    cfg = common.ablation_config("num_experts=2")
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (path / "stage3").mkdir()
    records = [{"stage": "stage3", "step": 10 * (i + 1), "loss": x, "ce": x - 0.1,
                "balance_loss": 2.0, "step_time": t, "tokens_per_s": 100.0,
                "moe/decoder/layers_0/expert_fraction": [0.75, 0.25],
                "moe/decoder/layers_2/expert_fraction": [0.5, 0.5]}
               for i, (x, t) in enumerate(zip(losses, (9.0, 0.2, 0.4, 0.3), strict=False))]
    (path / "stage3" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    if with_eval:
        (path / "eval.json").write_text(json.dumps({
            "stage": "stage3", "step": 40, "exact_match": 37.5, "seconds": 3.0,
            "exact_match_per_type": {"color": 50.0}, "pope": {"f1": 80.0, "tp": 4},
            "num_questions": 8}))


def test_collect_reads_metrics_and_tolerates_missing_parts(tmp_path):
    fake_workdir(tmp_path / "a", [3.0, 2.5, 2.0, 1.5], with_eval=True)
    fake_workdir(tmp_path / "b", [3.0, 2.9], with_eval=False)
    row = sweep.collect_point(tmp_path / "a")
    assert (row["stage"], row["step"], row["loss"], row["ce"]) == ("stage3", 40, 1.5, 1.4)
    assert row["step_time_s"] == 0.3  # median of the windows after the first (compilation)
    assert {k: v for k, v in row.items() if k.startswith("eval/")} == {
        "eval/exact_match": 37.5, "eval/exact_match_per_type.color": 50.0, "eval/pope.f1": 80.0}
    assert not any(k.startswith("eval/") for k in sweep.collect_point(tmp_path / "b"))
    assert sweep.collect_point(tmp_path / "never_trained") == {}
    # (0.75 * 2 + 0.5 * 2) / 2 layers
    assert sweep.load_imbalance(json.loads(
        (tmp_path / "a" / "stage3" / "metrics.jsonl").read_text().splitlines()[0])) == 1.25


def test_tables_hold_every_point(tmp_path):
    rows = [{"point": "num_experts_1", "num_experts": 1, "status": "ok", "eval": "",
             "loss": 2.0, "total_params": 1.0e6},
            {"point": "num_experts_2", "num_experts": 2, "status": "train failed (exit 1)",
             "eval": "", "eval/exact_match": 12.5}]
    columns = sweep.write_tables(rows, "num_experts", tmp_path)
    assert columns[:4] == ["point", "num_experts", "status", "eval"]
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table] == ["num_experts_1", "num_experts_2"]
    assert table[0]["loss"] == "2.0" and table[1]["eval/exact_match"] == "12.5"
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0].startswith("| point | num_experts | status |") and len(md) == 4
    assert "| 1.000e+06 |" in md[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """The built-in dataset, built once per test session (other modules reuse the folder)."""
    path = str(tmp_path_factory.getbasetemp() / "builtin_data")
    builtin.ensure_built(path)
    return path


def test_two_point_sweep_end_to_end(tmp_path, data_dir):
    out = tmp_path / "sweep"
    overrides = [f"--config.data.data_dir={data_dir}", "--config.stages=stage3",
                 "--config.stage3.init_from=none", "--config.stage3.num_steps=3",
                 "--config.stage3.batch_size=4", "--config.log_every=1",
                 "--config.model.decoder.num_layers=1", "--config.model.vision.depth=2",
                 "--config.vision_pretrain.steps=2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1",
           "XLA_FLAGS": "--xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true"}
    command = [sys.executable, "launch/sweep.py", "configs/ablations/experts.py",
               f"--workdir={out}", "--values=1,2", "--no-eval", "--", *overrides]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["point"], r["status"], r["eval"], r["step"]) for r in rows] == [
        ("num_experts_1", "ok", "skipped", "3"), ("num_experts_2", "ok", "skipped", "3")]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    # 1 layer, MoE with 2 experts: one extra expert and a 2-expert router over the dense model.
    dense, moe = (float(r["total_params"]) for r in rows)
    assert moe - dense == EXPERT_PARAMS + 2 * ROUTER_PARAMS
    for point in ("num_experts_1", "num_experts_2"):
        assert (out / point / "stage3" / "metrics.jsonl").exists()
    assert (out / "results.png").stat().st_size > 0
    assert "| num_experts_2 | 2 | ok |" in (out / "results.md").read_text()
    # The same command again trains nothing: both runs are marked done in sweep_state.json.
    metrics = (out / "num_experts_2" / "stage3" / "metrics.jsonl").read_text()
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("trained before (sweep_state.json), not retrained") == 2
    assert (out / "num_experts_2" / "stage3" / "metrics.jsonl").read_text() == metrics
