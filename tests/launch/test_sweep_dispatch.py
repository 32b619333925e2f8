"""launch/sweep.py beyond one local pass: the command per launcher, seeds (their folders,
overrides and the mean +- std of the tables, against hand arithmetic), and reruns that skip what
finished (training, evaluation, routing analysis)."""

import csv
import json
import math
import shlex
import threading
from pathlib import Path

import pytest

from configs.ablations import common
from launch import sweep

CONFIG = "configs/ablations/experts.py"


def dry_run(capsys, *args) -> list[list[str]]:
    assert sweep.main([CONFIG, "--values=2", "--dry-run", *args, "--", "--config.log_every=1"]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def test_dry_run_per_launcher(capsys):
    root = "gs://b/abl"
    where = ["--config=configs/ablations/experts.py:num_experts=2",
             f"--workdir={root}/num_experts_2"]
    evaluate = ["python", "-m", "moe_lvlm.evaluate", f"--workdir={root}/num_experts_2"]
    routing = ["python", "-m", "moe_lvlm.analyze_routing", f"--workdir={root}/num_experts_2",
               f"--out={root}/num_experts_2/routing"]
    assert dry_run(capsys, f"--workdir={root}", "--routing") == [
        ["python", "-m", "moe_lvlm.train", *where, "--config.log_every=1"], evaluate, routing]
    assert dry_run(capsys, f"--workdir={root}", "--launcher=tpu_pod", "--no-eval",
                   "--launcher-args=--name=pod --zone=us-east5-a --accelerator-type=v5p-64") == [
        ["launch/tpu_pod.sh", "--name=pod", "--zone=us-east5-a", "--accelerator-type=v5p-64",
         *where, "--", "--config.log_every=1"]]
    assert dry_run(capsys, f"--workdir={root}", "--launcher=slurm",
                   "--launcher-args=--nodes=2 --partition=gpu") == [
        ["launch/slurm_submit.sh", "--nodes=2", "--partition=gpu", "--wait",
         "--job-name=num_experts_2", "--", *where, "--config.log_every=1"],
        evaluate]


def test_seeds_get_their_folders_and_overrides(capsys):
    cmds = dry_run(capsys, "--workdir=/r", "--seeds=2", "--no-eval")
    assert cmds == [
        ["python", "-m", "moe_lvlm.train", "--config=configs/ablations/experts.py:num_experts=2",
         f"--workdir=/r/num_experts_2/seed_{s}", f"--config.seed={s}", f"--config.data.seed={s}",
         f"--config.vision_pretrain.seed={s}", "--config.log_every=1"] for s in (0, 1)]


def test_bad_launcher_use_is_refused(capsys):
    with pytest.raises(SystemExit):
        sweep.main([CONFIG, "--workdir=/local", "--launcher=tpu_pod", "--dry-run"])
    assert "needs a gs:// --workdir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main([CONFIG, "--workdir=/local", "--seeds=0", "--dry-run"])


def write_run(workdir: Path, num_experts: int, losses) -> None:
    """A workdir as moe_lvlm.train leaves it: its config and the last stage's metrics."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = common.ablation_config(f"num_experts={num_experts}")
    (workdir / "config.json").write_text(json.dumps(cfg.to_dict()))
    (workdir / "stage3").mkdir(exist_ok=True)
    (workdir / "stage3" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 10 * (i + 1), "loss": x, "ce": x, "step_time": 0.5}) + "\n"
        for i, x in enumerate(losses)))


class FakeCommands:
    """Stands in for the commands the sweep starts: training writes a workdir, evaluation
    prints a summary, the routing analysis fails the first time for `routing_fails`."""

    def __init__(self, routing_fails: str = ""):
        self.calls: list[tuple[str, str]] = []
        self.routing_fails = routing_fails

    def __call__(self, cmd, log):
        kind = next(k for k in ("slurm_submit", "moe_lvlm.train", "evaluate", "analyze_routing")
                    if any(k in c for c in cmd))
        workdir = Path(next(c for c in cmd if c.startswith("--workdir=")).split("=", 1)[1])
        self.calls.append((kind, workdir.name))
        log.parent.mkdir(parents=True, exist_ok=True)
        rc = 0
        if kind in ("slurm_submit", "moe_lvlm.train"):
            write_run(workdir, int(workdir.name.split("_")[-1]), [3.0, 2.0])
        elif kind == "evaluate":
            log.write_text(json.dumps({"exact_match": 50.0}) + "\n")
        elif workdir.name == self.routing_fails:
            self.routing_fails, rc = "", 1
        return type("Result", (), {"returncode": rc})()


def test_rerun_skips_finished_training_evaluation_and_routing(tmp_path, monkeypatch):
    fake = FakeCommands(routing_fails="num_experts_2")
    monkeypatch.setattr(sweep, "run_logged", fake)
    args = [CONFIG, f"--workdir={tmp_path}", "--values=1,2", "--launcher=slurm", "--routing"]
    assert sweep.main(args) == 0
    assert fake.calls == [
        ("slurm_submit", "num_experts_1"), ("evaluate", "num_experts_1"),
        ("analyze_routing", "num_experts_1"),
        ("slurm_submit", "num_experts_2"), ("evaluate", "num_experts_2"),
        ("analyze_routing", "num_experts_2")]
    assert json.loads((tmp_path / "num_experts_2" / "sweep_state.json").read_text()) == {
        "train": True, "eval": True}
    fake.calls.clear()
    assert sweep.main(args) == 0  # only the failed routing analysis runs again
    assert fake.calls == [("analyze_routing", "num_experts_2")]
    fake.calls.clear()
    assert sweep.main(args) == 0
    assert fake.calls == []
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["point"], r["status"], r["eval"], r["eval/exact_match"]) for r in rows] == [
        ("num_experts_1", "ok", "ok", "50.0"), ("num_experts_2", "ok", "ok", "50.0")]


def test_a_failed_training_is_retried(tmp_path, monkeypatch):
    calls = []

    def failing(cmd, log):
        calls.append(cmd)
        return type("Result", (), {"returncode": 75})()

    monkeypatch.setattr(sweep, "run_logged", failing)
    args = [CONFIG, f"--workdir={tmp_path}", "--values=2", "--no-eval"]
    assert sweep.main(args) == 1
    assert sweep.main(args) == 1
    assert len(calls) == 2
    assert not (tmp_path / "num_experts_2" / "sweep_state.json").exists()


def test_seed_tables_report_mean_and_std(tmp_path):
    # Final losses per seed; by hand: point 1 mean 7/3, sample std sqrt(7/3) = 1.5275;
    # point 2 mean 11, std 1: |11 - 7/3| = 8.67 > 1.53 + 1, so it is marked beyond the spread.
    finals = {1: [1.0, 2.0, 4.0], 2: [10.0, 11.0, 12.0]}
    for e, losses in finals.items():
        for seed, x in enumerate(losses):
            write_run(tmp_path / f"num_experts_{e}" / f"seed_{seed}", e, [20.0, x])
    assert sweep.main([CONFIG, f"--workdir={tmp_path}", "--values=1,2", "--seeds=3",
                       "--collect-only", "--no-eval"]) == 0
    with (tmp_path / "results.csv").open() as f:
        rows = {r["point"]: r for r in csv.DictReader(f)}
    assert math.isclose(float(rows["num_experts_1"]["loss"]), 7 / 3)
    assert math.isclose(float(rows["num_experts_1"]["loss_std"]), math.sqrt(7 / 3))
    assert (float(rows["num_experts_2"]["loss"]), float(rows["num_experts_2"]["loss_std"])) == (
        11.0, 1.0)
    assert rows["num_experts_1"]["seeds"] == "3" and rows["num_experts_1"]["status"] == "ok"
    md = (tmp_path / "results.md").read_text()
    assert "| 2.333 ± 1.528 |" in md and "| 11 ± 1 * |" in md
    with (tmp_path / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert [(r["point"], r["seed"], r["loss"]) for r in runs] == [
        (f"num_experts_{e}", str(s), str(x)) for e, xs in finals.items() for s, x in enumerate(xs)]
    assert (tmp_path / "results.png").stat().st_size > 0


def test_aggregate_skips_failed_runs_and_missing_values():
    rows = [{"point": "p", "a": 1, "status": "ok", "eval": "ok", "loss": 1.0},
            {"point": "p", "a": 1, "status": "ok", "eval": "ok", "loss": 3.0},
            {"point": "p", "a": 1, "status": "train failed (exit 1)", "eval": ""}]
    (row,) = sweep.aggregate(rows, "a")
    assert (row["seeds"], row["status"], row["loss"], row["loss_std"]) == (
        2, "1 of 3 failed", 2.0, math.sqrt(2.0))
    assert row["ce"] is None and row["ce_std"] is None
    assert sweep.mean_std([5.0]) == (5.0, None)


def test_score_summary_for_the_plot():
    # Exact match of three seeds 80, 90, 100: mean 90, sample std 10 by hand; the failed run and
    # the point without scores are left out, a single value has no std.
    rows = [{"point": "p", "status": "ok", "eval/exact_match": x, "eval/pope.f1": 50.0 + x / 10}
            for x in (80.0, 90.0, 100.0)]
    rows += [{"point": "p", "status": "train failed (exit 1)", "eval/exact_match": 0.0},
             {"point": "q", "status": "ok", "eval/exact_match_per_type.yes_no": 60.0},
             {"point": "r", "status": "ok"}]
    summary = sweep.score_summary(rows)
    assert list(summary) == ["p", "q"]
    assert summary["p"]["exact match"] == (90.0, 10.0, [80.0, 90.0, 100.0])
    assert summary["p"]["POPE F1"] == (59.0, 1.0, [58.0, 59.0, 60.0])
    assert summary["q"] == {"yes/no": (60.0, None, [60.0])}


def test_one_slice_per_run_by_name(capsys):
    cmds = dry_run(capsys, "--workdir=gs://b/a", "--seeds=2", "--no-eval", "--launcher=tpu_pod",
                   "--jobs=2", "--launcher-args=--name=abl-{run} --zone=us-east5-a")
    assert [c[:3] for c in cmds] == [
        ["launch/tpu_pod.sh", f"--name=abl-num-experts-2-seed-{s}", "--zone=us-east5-a"]
        for s in (0, 1)]
    with pytest.raises(SystemExit):
        sweep.main([CONFIG, "--workdir=gs://b/a", "--launcher=tpu_pod", "--jobs=2",
                    "--launcher-args=--name=abl", "--dry-run"])
    assert "needs one slice per run" in capsys.readouterr().err


def test_jobs_keep_runs_in_flight_together(tmp_path, monkeypatch):
    barrier = threading.Barrier(2, timeout=20)
    fake = FakeCommands()

    def together(cmd, log):
        if any("moe_lvlm.train" in c for c in cmd):
            barrier.wait()  # both trainings must be running at once, or this times out
        return fake(cmd, log)

    monkeypatch.setattr(sweep, "run_logged", together)
    assert sweep.main([CONFIG, f"--workdir={tmp_path}", "--values=1,2", "--jobs=2",
                       "--no-eval"]) == 0
    assert sorted(fake.calls) == [("moe_lvlm.train", "num_experts_1"),
                                  ("moe_lvlm.train", "num_experts_2")]
    with (tmp_path / "results.csv").open() as f:
        assert [r["point"] for r in csv.DictReader(f)] == ["num_experts_1", "num_experts_2"]


class SharingFake:
    """Training writes a run with dense stages (stage1, stage2 holding the run's path, and a
    vision tower) and records what the workdir held before; `fails` names runs that fail."""

    def __init__(self, fails=()):
        self.found: dict[str, list[str]] = {}
        self.fails = fails

    def __call__(self, cmd, log):
        workdir = Path(next(c for c in cmd if c.startswith("--workdir=")).split("=", 1)[1])
        run = f"{workdir.parent.name}/{workdir.name}"
        self.found[run] = sorted(p.name for p in workdir.iterdir()) if workdir.exists() else []
        if run in self.fails:
            return type("Result", (), {"returncode": 1})()
        experts = workdir.parent.name.split("_")[-1]
        write_run(workdir, int(experts) if experts.isdigit() else 4, [3.0, 2.0])
        for stage in ("stage1", "stage2"):
            if not (workdir / stage).exists():
                (workdir / stage).mkdir()
                (workdir / stage / "metrics.jsonl").write_text(run)
        (workdir / "vision_pretrain.npz").write_bytes(run.encode())
        return type("Result", (), {"returncode": 0})()


def test_share_dense_stages_copies_the_first_points_per_seed(tmp_path, monkeypatch):
    """Each seed's first point trains from nothing; the other point of that seed starts from a
    copy of its dense stages (not its config), after it has trained, with --jobs too."""
    fake = SharingFake()
    monkeypatch.setattr(sweep, "run_logged", fake)
    monkeypatch.setattr(sweep, "param_counts", lambda config: {})  # not what this checks
    assert sweep.main([CONFIG, f"--workdir={tmp_path}", "--values=1,2", "--seeds=2", "--jobs=2",
                       "--no-eval", "--share-dense-stages"]) == 0
    assert fake.found == {
        "num_experts_1/seed_0": [], "num_experts_1/seed_1": [],
        "num_experts_2/seed_0": ["stage1", "stage2", "vision_pretrain.npz"],
        "num_experts_2/seed_1": ["stage1", "stage2", "vision_pretrain.npz"]}
    for seed in (0, 1):
        copy = tmp_path / "num_experts_2" / f"seed_{seed}"
        assert (copy / "stage2" / "metrics.jsonl").read_text() == f"num_experts_1/seed_{seed}"


def test_share_dense_stages_waits_for_a_source_that_failed(tmp_path, monkeypatch):
    fake = SharingFake(fails=("num_experts_1/seed_0",))
    monkeypatch.setattr(sweep, "run_logged", fake)
    monkeypatch.setattr(sweep, "param_counts", lambda config: {})
    assert sweep.main([CONFIG, f"--workdir={tmp_path}", "--values=1,2", "--seeds=2",
                       "--no-eval", "--share-dense-stages"]) == 1
    assert "num_experts_2/seed_0" not in fake.found and "num_experts_2/seed_1" in fake.found
    with (tmp_path / "runs.csv").open() as f:
        status = {(r["point"], r["seed"]): r["status"] for r in csv.DictReader(f)}
    assert "dense stages' run" in status[("num_experts_2", "0")]


def test_share_dense_stages_refuses_an_axis_that_changes_them(capsys):
    """Without stage I, stage II starts fresh: its dense stages differ from the full recipe's."""
    assert sweep.main(["configs/ablations/stages.py", "--workdir=/r", "--share-dense-stages",
                       "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "recipe_no_stage1" in err
    assert "stage2.init_from: 'stage1' -> 'none'" in err
    # Without stage II, stage III upcycles stage I: that one is shared (the dry run says so).
    assert sweep.main(["configs/ablations/stages.py", "--workdir=/r", "--share-dense-stages",
                       "--values=full,no_stage2", "--dry-run", "--no-eval"]) == 0
    assert "# recipe_no_stage2: copy vision_pretrain.npz, vision_pretrain.json, stage1 of " \
           "/r/recipe_full to /r/recipe_no_stage2" in capsys.readouterr().out


def test_dense_stages_from_another_run_checks_its_config(tmp_path, capsys, monkeypatch):
    source = tmp_path / "top_k_1" / "seed_0"
    (source / "stage1").mkdir(parents=True)
    (source / "stage2").mkdir()
    cfg = sweep.point_config("configs/ablations/top_k.py", "top_k=1,dispatch=capacity",
                             sweep.seed_overrides(0))
    (source / "config.json").write_text(json.dumps(cfg.to_dict()))
    args = ["configs/ablations/combine_weights.py", "--values=softmax", "--seeds=1", "--no-eval",
            f"--dense-stages-from={source}"]
    # combine_weights runs top-2 with capacity dispatch: its dense stages are top_k's.
    assert sweep.main([*args, "--workdir=/r", "--dry-run"]) == 0
    assert f"copy vision_pretrain.npz, vision_pretrain.json, stage1, stage2 of {source}" in \
        capsys.readouterr().out
    # Another seed trains other dense stages.
    assert sweep.main([*args, "--workdir=/r", "--dry-run", "--", "--config.seed=1"]) == 2
    assert "(seed: 0 -> 1)" in capsys.readouterr().err
    # Run: the source is no run of this sweep, nothing waits for it.
    fake = SharingFake()
    monkeypatch.setattr(sweep, "run_logged", fake)
    monkeypatch.setattr(sweep, "param_counts", lambda config: {})
    assert sweep.main([*args, f"--workdir={tmp_path / 'cw'}", "--jobs=2"]) == 0
    assert fake.found == {"cw/combine_weights_softmax": ["stage1", "stage2"]}


def test_seed_table_has_one_column_per_score(tmp_path):
    rows = [{"point": "p", "a": 1, "status": "ok", "eval": "ok", "eval/exact_match": x}
            for x in (40.0, 44.0)]
    sweep.write_seed_tables(sweep.aggregate(rows, "a"), "a", tmp_path)
    header, _, row = (tmp_path / "results.md").read_text().splitlines()[:3]
    assert header.count("eval/exact_match") == 1 and "_std" not in header
    assert "| 42 ± 2.828 |" in row
