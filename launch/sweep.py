"""Run an ablation sweep (configs/ablations/*.py) point by point and tabulate the results.

    python launch/sweep.py configs/ablations/experts.py --workdir=runs/ablations/experts \
        [--values=1,8] [--seeds=3] [--config-args=steps=0.1] [--eval-args=--limit=200] \
        [--no-eval] [--routing] [--launcher=local|tpu_pod|slurm] [--launcher-args='...'] \
        [--jobs=N] [--share-dense-stages | --dense-stages-from=RUN] [--dry-run | --collect-only]
        [-- --config.data.data_dir=DIR ...]

Each value V of the file's `AXIS` (default: all its `VALUES`) trains
`python -m moe_lvlm.train --config=FILE:AXIS=V[,CONFIG_ARGS] --workdir=WORKDIR/AXIS_V [ARGS]`,
through the launcher: `local` runs it here; `tpu_pod` runs `launch/tpu_pod.sh LAUNCHER_ARGS
--config=... --workdir=... -- ARGS` (one slice, reused point after point; it relaunches after
preemptions until training is complete); `slurm` runs `launch/slurm_submit.sh LAUNCHER_ARGS --wait
--job-name=... -- ...` (requeued after preemptions; `--wait` returns when the job has ended).
`--jobs=N` keeps N runs in flight at once (`{run}` in `--launcher-args` becomes each run's
name, e.g. `--name=abl-{run}` for one TPU slice per run).
With `--seeds=N` (N > 1) every point trains N times, seeds 0..N-1 (`--config.seed`,
`--config.data.seed`, `--config.vision_pretrain.seed`), in `WORKDIR/AXIS_V/seed_S`.
With `--share-dense-stages` the first point of each seed trains fully and the others start
from a copy of its finished dense stages (launch/dense_stages.py: refused for an axis that
changes them); `--dense-stages-from=RUN` copies them from a finished run (RUN/seed_S) instead.
After training, each run is scored here with `python -m moe_lvlm.evaluate --workdir=...` (its JSON
summary kept in `eval.json`) and, with `--routing`, analysed with
`python -m moe_lvlm.analyze_routing --workdir=RUN --out=RUN/routing`.
Each step that succeeds is recorded in the run's `sweep_state.json`: a rerun skips finished
training, evaluation and routing analysis (delete the file to redo a run).
`--dry-run` prints the commands and runs nothing; `--collect-only` tabulates workdirs trained
earlier. Writes `WORKDIR/results.md`, `results.csv` and `results.png` (loss curves and expert
load of the last stage); with seeds, one row per point with mean and std over the seeds, and
every run in `runs.csv`. The exit status is 1 if any run failed to train.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `configs` and `moe_lvlm` importable
    sys.path.insert(0, str(REPO_ROOT))

from etils import epath  # noqa: E402  (after the sys.path line, like the project imports)

from launch import dense_stages  # noqa: E402

EVAL_FILE = "eval.json"
STATE_FILE = "sweep_state.json"
LAUNCHERS = ("local", "tpu_pod", "slurm")
RESULT_COLUMNS = ("total_params", "active_params", "loss", "ce", "balance_loss", "step_time_s",
                  "tokens_per_s")


def load_sweep_module(path: str | Path):
    """The config module at `path` (a `configs/ablations/*.py` file)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None or not Path(path).is_file():
        raise FileNotFoundError(f"sweep config {path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_sweep(path: str | Path) -> tuple[str, tuple]:
    """(AXIS, VALUES) of an ablation config file."""
    module = load_sweep_module(path)
    if not hasattr(module, "AXIS") or not hasattr(module, "VALUES"):
        raise ValueError(f"{path} defines no AXIS and VALUES: it is not a sweep config")
    return module.AXIS, tuple(module.VALUES)


def point_name(axis: str, value: Any) -> str:
    return f"{axis}_{value}"


def join(root: str, name: str) -> str:
    """`root/name`, joined as text so that `gs://` roots keep their two slashes."""
    return f"{root.rstrip('/')}/{name}"


def epath_of(path: str | os.PathLike) -> epath.Path:
    """Local folders and gs:// alike (etils.epath, as orbax and the workdir use)."""
    return epath.Path(os.fspath(path))


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a sweep: a point (AXIS_V) and, with several seeds, a seed."""

    point: str
    value: Any
    seed: int | None
    workdir: str

    @property
    def name(self) -> str:
        return self.point if self.seed is None else f"{self.point}/seed_{self.seed}"


def for_run(args: Sequence[str], run: Run) -> list[str]:
    """Launcher arguments with `{run}` replaced by the run's name as a TPU/SLURM-safe slug
    (lower case, digits, hyphens): `--name=abl-{run}` gives each run its own slice."""
    slug = re.sub(r"[^a-z0-9]+", "-", run.name.lower()).strip("-")
    return [a.replace("{run}", slug) for a in args]


def plan_runs(root: str, axis: str, values: Sequence, seeds: int) -> list[Run]:
    """Every run, point by point; one seed keeps today's layout (no seed folder, no overrides)."""
    runs = []
    for value in values:
        point = point_name(axis, value)
        for seed in [None] if seeds == 1 else range(seeds):
            name = point if seed is None else f"{point}/seed_{seed}"
            runs.append(Run(point, value, seed, join(root, name)))
    return runs


def seed_overrides(seed: int | None) -> list[str]:
    """The config overrides of a seed: parameter init and router noise, data order, and the
    demo's vision-tower pre-training."""
    if seed is None:
        return []
    return [f"--config.seed={seed}", f"--config.data.seed={seed}",
            f"--config.vision_pretrain.seed={seed}"]


def train_command(config: str, axis: str, value: Any, workdir: str, config_args: str,
                  overrides: Sequence[str], python: str = sys.executable,
                  launcher: str = "local", launcher_args: Sequence[str] = (),
                  job_name: str = "") -> list[str]:
    """The command that trains one run, through `launcher` (run from the repository root)."""
    where = [f"--config={config}:{point_arg(axis, value, config_args)}", f"--workdir={workdir}"]
    if launcher == "local":
        return [python, "-m", "moe_lvlm.train", *where, *overrides]
    if launcher == "tpu_pod":
        return ["launch/tpu_pod.sh", *launcher_args, *where, "--", *overrides]
    if launcher == "slurm":
        return ["launch/slurm_submit.sh", *launcher_args, "--wait", f"--job-name={job_name}",
                "--", *where, *overrides]
    raise ValueError(f"--launcher={launcher!r}: use one of {LAUNCHERS}")


def point_config(config: str, arg: str, overrides: Sequence[str]):
    """The run config `moe_lvlm.train --config=CONFIG:ARG OVERRIDES` builds (its `--config.*`
    overrides applied as the training flags apply them)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["sweep", f"--config={config}:{arg}",
            *[o for o in overrides if o.startswith("--config.")]]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def plan_sharing(runs: Sequence[Run], opts, axis: str,
                 overrides: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """With --share-dense-stages, for each run that starts from another's dense stages: (the
    run it copies them from, the stages). Refuses (ValueError) a point that trains them
    otherwise."""
    if not (opts.share_dense_stages or opts.dense_stages_from):
        return {}
    plan = {}
    for run in runs:
        over = [*seed_overrides(run.seed), *overrides]
        if opts.dense_stages_from:
            source = opts.dense_stages_from if run.seed is None else join(
                opts.dense_stages_from, f"seed_{run.seed}")
            stored = epath_of(source) / "config.json"
            if not stored.exists():
                raise ValueError(f"--dense-stages-from: {stored} not found (train that run first)")
            import ml_collections

            first = ml_collections.ConfigDict(json.loads(stored.read_text()))
        else:
            source_run = next(r for r in runs if r.seed == run.seed)
            if source_run is run:
                continue
            source = source_run.workdir
            first = point_config(opts.config, point_arg(axis, source_run.value, opts.config_args),
                                 over)
        cfg = point_config(opts.config, point_arg(axis, run.value, opts.config_args), over)
        plan[run.name] = (source, dense_stages.shared_stages(first, cfg, source, run.name))
    return plan


def point_arg(axis: str, value: Any, config_args: str) -> str:
    return ",".join(filter(None, [f"{axis}={value}", config_args]))


def eval_command(workdir: str | Path, eval_args: Sequence[str],
                 python: str = sys.executable) -> list[str]:
    return [python, "-m", "moe_lvlm.evaluate", f"--workdir={workdir}", *eval_args]


def routing_command(workdir: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", "moe_lvlm.analyze_routing", f"--workdir={workdir}",
            f"--out={join(workdir, 'routing')}"]


def run_logged(cmd: Sequence[str], log: Path) -> subprocess.CompletedProcess:
    """Run from the repository root with output to `log` (appended); returns the result."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, text=True,
                              check=False)


def last_json_line(text: str) -> dict | None:
    """The last line of `text` that is a JSON object (evaluate's summary), else None."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def evaluate_point(workdir: str | Path, eval_args: Sequence[str], log: Path | None = None) -> str:
    """Score a trained run, keeping the summary in `eval.json`; returns 'ok' or why not."""
    if importlib.util.find_spec("moe_lvlm.evaluate") is None:
        return "no moe_lvlm.evaluate"
    log = Path(workdir) / "eval.log" if log is None else log
    start = log.stat().st_size if log.exists() else 0
    result = run_logged(eval_command(workdir, eval_args), log)
    summary = last_json_line(log.read_text()[start:])
    if result.returncode != 0 or summary is None:
        return f"failed (exit {result.returncode}, see {log})"
    (epath_of(workdir) / EVAL_FILE).write_text(json.dumps(summary, indent=1))
    return "ok"


def read_state(workdir: str) -> dict:
    """Which steps of a run have succeeded (`sweep_state.json`): train, eval, routing."""
    path = epath_of(workdir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def mark_done(workdir: str, step: str) -> None:
    state = read_state(workdir)
    state[step] = True
    path = epath_of(workdir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))


# ----------------------------------------------------------------------------- collecting


def read_jsonl(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_stage(config: dict) -> str:
    return [s.strip() for s in config["stages"].split(",") if s.strip()][-1]


def param_counts(config: dict) -> dict[str, float]:
    """Total and activated (experts scaled by top_k / num_experts) parameters of the model
    trained by the last stage, from shapes only."""
    import flax.linen as nn
    import jax
    import ml_collections
    from flax import traverse_util

    from moe_lvlm.models.lvlm import build_model
    from moe_lvlm.train import loop
    from moe_lvlm.train.stages import stage_model

    cfg = ml_collections.ConfigDict(config)
    names = loop.stage_names(cfg)
    model_cfg = stage_model(cfg, names, names[-1])
    model_cfg.image_token_id = 0
    inputs = loop.example_inputs(model_cfg, 1, 8, 1)
    shapes = nn.meta.unbox(jax.eval_shape(lambda r: build_model(model_cfg).init(r, *inputs),
                                          jax.random.PRNGKey(0)))
    moe = model_cfg.moe
    total = active = 0.0
    for path, leaf in traverse_util.flatten_dict(shapes["params"], sep="/").items():
        n = float(math.prod(leaf.shape))
        total += n
        active += n * moe.top_k / moe.num_experts if "/moe/experts/" in path else n
    return {"total_params": total, "active_params": active}


def flat_numbers(summary: dict, prefix: str = "eval/") -> dict[str, float]:
    """The scores of an evaluate summary (its float fields; nested ones as `eval/a.b`), without
    counts and bookkeeping."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, float) and key != "seconds":
            out[prefix + key] = value
        elif isinstance(value, dict):
            out.update(flat_numbers(value, f"{prefix}{key}."))
    return out


def collect_point(workdir: str | os.PathLike) -> dict[str, Any]:
    """One table row from a trained workdir (local or gs://; missing parts stay missing)."""
    workdir = epath_of(workdir)
    row: dict[str, Any] = {}
    config_path = workdir / "config.json"
    if not config_path.exists():
        return row
    config = json.loads(config_path.read_text())
    stage = last_stage(config)
    records = read_jsonl(workdir / stage / "metrics.jsonl")
    row.update(param_counts(config), stage=stage)
    if records:
        last = records[-1]
        row.update(step=last["step"], loss=last["loss"], ce=last["ce"],
                   balance_loss=last.get("balance_loss"), tokens_per_s=last.get("tokens_per_s"))
        # The first logging window includes compilation: leave it out when there are others.
        times = [r["step_time"] for r in records[1:] or records if "step_time" in r]
        row["step_time_s"] = statistics.median(times) if times else None
    eval_path = workdir / EVAL_FILE
    if eval_path.exists():
        row.update(flat_numbers(json.loads(eval_path.read_text())))
    return row


def load_imbalance(record: dict) -> float | None:
    """max_e(fraction_e) * E averaged over MoE layers: 1 = perfectly balanced; None if dense."""
    loads = [v for k, v in record.items() if k.endswith("/expert_fraction")]
    if not loads:
        return None
    return statistics.mean(max(f) * len(f) for f in loads)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std None for one value, both for none."""
    values = [float(v) for v in values]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def numeric_columns(rows: Sequence[dict]) -> list[str]:
    evals = sorted({k for r in rows for k in r if k.startswith("eval/") and not k.endswith("_std")})
    return ["step", *RESULT_COLUMNS, *evals]


def aggregate(rows: Sequence[dict], axis: str) -> list[dict]:
    """One row per point over its seeds: `COL` the mean and `COL_std` the sample std of every
    numeric column (over the runs that have it), `seeds` the runs that trained."""
    out: dict[str, dict] = {}
    columns = numeric_columns(rows)
    for point in dict.fromkeys(r["point"] for r in rows):
        runs = [r for r in rows if r["point"] == point]
        ok = [r for r in runs if r["status"] == "ok"]
        failed = len(runs) - len(ok)
        row = {"point": point, axis: runs[0][axis], "seeds": len(ok),
               "status": "ok" if not failed else f"{failed} of {len(runs)} failed",
               "eval": "ok" if all(r.get("eval") == "ok" for r in runs) else
               ",".join(sorted({str(r.get("eval") or "-") for r in runs})),
               "stage": runs[0].get("stage")}
        for column in columns:
            mean, std = mean_std([r[column] for r in ok if r.get(column) is not None])
            row[column], row[f"{column}_std"] = mean, std
        out[point] = row
    return list(out.values())


def beyond_spread(row: dict, base: dict, column: str) -> bool:
    """Whether the point's mean +- std interval misses the baseline's (a screen over a few seeds,
    not a significance test)."""
    values = [row.get(column), row.get(f"{column}_std"), base.get(column),
              base.get(f"{column}_std")]
    if any(v is None for v in values):
        return False
    mean, std, base_mean, base_std = values
    return abs(mean - base_mean) > std + base_std


# ----------------------------------------------------------------------------- outputs


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def write_csv(rows: Sequence[dict], columns: Sequence[str], path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    epath_of(path).write_text(text.getvalue())


def write_tables(rows: list[dict], axis: str, out_dir, name: str = "results",
                 lead: Sequence[str] = ()) -> list[str]:
    """NAME.csv and NAME.md; returns the columns."""
    extra = sorted({k for r in rows for k in r if k.startswith("eval/")})
    columns = ["point", axis, *lead, "status", "eval", "stage", "step", *RESULT_COLUMNS, *extra]
    out_dir = epath_of(out_dir)
    write_csv(rows, columns, out_dir / f"{name}.csv")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return columns


def write_seed_tables(points: list[dict], axis: str, out_dir) -> None:
    """results.csv (mean and `_std` columns) and results.md (`mean ± std`, `*` where the point's
    interval misses the first point's)."""
    numeric = [c for c in numeric_columns(points) if any(p.get(c) is not None for p in points)]
    lead = ["point", axis, "seeds", "status", "eval", "stage"]
    csv_columns = lead + [x for c in numeric for x in (c, f"{c}_std")]
    out_dir = epath_of(out_dir)
    write_csv(points, csv_columns, out_dir / "results.csv")
    base = points[0]

    def cell(row: dict, column: str) -> str:
        mean, std = row.get(column), row.get(f"{column}_std")
        text = _fmt(mean) + (f" ± {_fmt(std)}" if std is not None else "")
        return text + (" *" if row is not base and beyond_spread(row, base, column) else "")

    lines = ["| " + " | ".join(lead + numeric) + " |", "|" + "---|" * (len(lead) + len(numeric))]
    lines += ["| " + " | ".join([*(_fmt(r.get(c)) for c in lead), *(cell(r, c) for c in numeric)])
              + " |" for r in points]
    lines += ["", f"mean ± sample std over the seeds of each point; `*`: the interval mean ± std "
              f"misses {base['point']}'s (a screen over few seeds, not a significance test)."]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def curve(workdir: str, stage: str) -> tuple[list[int], list[float], list[float | None]]:
    """(steps, losses, load imbalance) logged in a run's `stage`."""
    records = read_jsonl(epath_of(workdir) / stage / "metrics.jsonl")
    return ([r["step"] for r in records], [r["loss"] for r in records],
            [load_imbalance(r) for r in records])


# Held-out scores drawn in results.png (eval.json keys as flattened into the rows).
SCORE_COLUMNS = (("eval/exact_match", "exact match"),
                 ("eval/exact_match_per_type.yes_no", "yes/no"), ("eval/pope.f1", "POPE F1"))


def score_summary(rows: Sequence[dict]) -> dict[str, dict[str, tuple]]:
    """Per point (that has held-out scores) and score of SCORE_COLUMNS: (mean, std or None, the
    seeds' values), over the runs that trained."""
    out: dict[str, dict[str, tuple]] = {}
    for point in dict.fromkeys(r["point"] for r in rows):
        ok = [r for r in rows if r["point"] == point and r.get("status") == "ok"]
        scores = {}
        for column, label in SCORE_COLUMNS:
            values = [float(r[column]) for r in ok if r.get(column) is not None]
            if values:
                scores[label] = (*mean_std(values), values)
        if scores:
            out[point] = scores
    return out


def plot(rows: list[dict], workdirs: list[str], out_path) -> None:
    """Loss curves and expert-load imbalance over the last stage, one line per point: the mean
    over its seeds, with a band of +- one std where it has several; and, when the runs were
    evaluated, their held-out scores: one bar per point and score (the mean, +- one std, each
    seed a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs_of: dict[str, list[tuple]] = {}
    for row, workdir in zip(rows, workdirs, strict=True):
        steps, losses, loads = curve(workdir, str(row.get("stage")))
        if steps:
            runs_of.setdefault(row["point"], []).append((steps, losses, loads))
    scores = score_summary(rows)
    fig, axes = plt.subplots(1, 3 if scores else 2, figsize=(18 if scores else 12, 4))
    loss_ax, load_ax = axes[:2]
    for point, runs in runs_of.items():
        common = sorted(set.intersection(*(set(s) for s, _, _ in runs)))
        for ax, which in ((loss_ax, 1), (load_ax, 2)):
            series = [[dict(zip(r[0], r[which], strict=True))[s] for s in common] for r in runs]
            if not common or any(v is None for s in series for v in s):
                continue
            values = np.asarray(series, dtype=float)
            mean = values.mean(axis=0)
            (line,) = ax.plot(common, mean, label=point)
            if len(runs) > 1:
                std = values.std(axis=0, ddof=1)
                ax.fill_between(common, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    loss_ax.set(xlabel="step", ylabel="loss", title="training loss (last stage)")
    load_ax.set(xlabel="step", ylabel="max expert load x E (1 = balanced)",
                title="expert load imbalance, mean over MoE layers")
    if scores:
        plot_scores(axes[2], scores)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    epath_of(out_path).write_bytes(buffer.getvalue())


def plot_scores(ax, scores: dict[str, dict[str, tuple]]) -> None:
    """Grouped bars of `score_summary`: a group per point, a bar per score."""
    labels = [label for _, label in SCORE_COLUMNS]
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [p for p, point in enumerate(scores) if label in scores[point]]
        if not xs:
            continue
        cells = [scores[point][label] for point in scores if label in scores[point]]
        positions = [x - 0.4 + width * (i + 0.5) for x in xs]
        ax.bar(positions, [c[0] for c in cells], width, label=label,
                      yerr=[c[1] or 0.0 for c in cells], capsize=3)
        for position, cell in zip(positions, cells, strict=True):
            ax.plot([position] * len(cell[2]), cell[2], "o", markersize=3, color="black", alpha=0.6)
    ax.set_xticks(range(len(scores)), list(scores), rotation=15, fontsize=8)
    ax.set(ylabel="%", ylim=(0, 100), title="held-out scores (mean +- std, dots: seeds)")


# ----------------------------------------------------------------------------- CLI


def parse_values(text: str | None, values: tuple) -> tuple:
    """`--values=1,8` -> the matching VALUES (typed as in the file)."""
    if not text:
        return values
    by_name = {str(v): v for v in values}
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in by_name]
    if unknown:
        raise ValueError(f"--values {unknown} not in the sweep's VALUES {list(by_name)}")
    return tuple(by_name[v] for v in chosen)


def log_dir(run: Run, log_root: str | None) -> Path:
    """Where the run's train/eval/routing logs go: its workdir when that is local, else
    LOG_ROOT/RUN (gs:// workdirs: the logs stay on this machine)."""
    if "://" not in run.workdir:
        return Path(run.workdir)
    return Path(log_root or "sweep-logs") / run.name


def train_run(run: Run, opts, axis: str, overrides: Sequence[str],
              launcher_args: Sequence[str], shared: tuple[str, list[str]] | None,
              source_trained: Future | None) -> str:
    """Train one run unless its state says it trained; 'ok' or why not. With `shared` (source
    run, stages) it first copies those dense stages, once `source_trained` says they trained."""
    logs = log_dir(run, opts.log_dir)
    if read_state(run.workdir).get("train"):
        print(f"[sweep] {run.name}: trained before (sweep_state.json), not retrained", flush=True)
        return "ok"
    if shared is not None:
        source, stages = shared
        if source_trained is not None and source_trained.result() != "ok":
            return f"train failed (its dense stages' run {source} failed)"
        copied = dense_stages.copy_dense(source, run.workdir, stages)
        print(f"[sweep] {run.name}: dense stages {stages} from {source} (copied: "
              f"{', '.join(copied) or 'nothing, already there'})", flush=True)
    print(f"[sweep] {run.name}: training in {run.workdir} ({opts.launcher})", flush=True)
    job = run.name.replace("/", "-")
    cmd = train_command(opts.config, axis, run.value, run.workdir, opts.config_args,
                        [*seed_overrides(run.seed), *overrides], launcher=opts.launcher,
                        launcher_args=for_run(launcher_args, run), job_name=job)
    result = run_logged(cmd, logs / "train.log")
    if result.returncode != 0:
        return f"train failed (exit {result.returncode}, see {logs / 'train.log'})"
    mark_done(run.workdir, "train")
    return "ok"


def execute(run: Run, opts, axis: str, overrides: Sequence[str], eval_args: Sequence[str],
            launcher_args: Sequence[str], shared: tuple[str, list[str]] | None = None,
            source_trained: Future | None = None,
            trained: Future | None = None) -> tuple[str, str]:
    """Train (`train_run`), evaluate and analyse one run, skipping the steps its state marks
    done; returns (status, evaluation). `trained` gets the training's status as soon as it is
    known, so that runs sharing its dense stages need not wait for its evaluation."""
    logs = log_dir(run, opts.log_dir)
    state = read_state(run.workdir)
    try:
        status = train_run(run, opts, axis, overrides, launcher_args, shared, source_trained)
    except BaseException:
        if trained is not None:
            trained.set_result("train failed (the sweep raised)")
        raise
    if trained is not None:
        trained.set_result(status)
    if status != "ok":
        return status, ""
    evaluated = "skipped"
    if not opts.no_eval:
        evaluated = "ok" if state.get("eval") else evaluate_point(run.workdir, eval_args,
                                                                  logs / "eval.log")
        if evaluated == "ok":
            mark_done(run.workdir, "eval")
    if opts.routing and not state.get("routing"):
        result = run_logged(routing_command(run.workdir), logs / "routing.log")
        if result.returncode == 0:
            mark_done(run.workdir, "routing")
        else:
            print(f"[sweep] {run.name}: routing analysis failed (exit {result.returncode}, see "
                  f"{logs / 'routing.log'})", flush=True)
    return "ok", evaluated


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="TRAIN_ARGS go to moe_lvlm.train unchanged.",
        usage="%(prog)s CONFIG --workdir=DIR [options] [-- TRAIN_ARGS]")
    parser.add_argument("config", help="a sweep config file, e.g. configs/ablations/experts.py")
    parser.add_argument("--workdir", required=True, help="one subfolder per point goes here")
    parser.add_argument("--values", default=None, help="comma-separated subset of VALUES")
    parser.add_argument("--seeds", type=int, default=1, help="runs per point, seeds 0..N-1")
    parser.add_argument("--config-args", default="", help="more key=value config arguments")
    parser.add_argument("--eval-args", default="", help="arguments for moe_lvlm.evaluate")
    parser.add_argument("--no-eval", action="store_true", help="skip moe_lvlm.evaluate")
    parser.add_argument("--routing", action="store_true",
                        help="run moe_lvlm.analyze_routing on each run after evaluation")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="how each run trains: here, on a TPU slice, or as a SLURM job")
    parser.add_argument("--launcher-args", default="",
                        help="options for launch/tpu_pod.sh or launch/slurm_submit.sh")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs in flight at once (each trains, evaluates, analyses)")
    parser.add_argument("--share-dense-stages", action="store_true",
                        help="train the first point of each seed fully; the other points start "
                        "from a copy of its dense stages (vision pre-training, stages I, II) and "
                        "train only the MoE stages")
    parser.add_argument("--dense-stages-from", default=None, metavar="RUN",
                        help="every point starts from a copy of the dense stages of the finished "
                        "run RUN (RUN/seed_S with --seeds), e.g. another sweep's first point")
    parser.add_argument("--log-dir", default=None,
                        help="logs of runs whose workdir is remote (default ./sweep-logs)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands only")
    mode.add_argument("--collect-only", action="store_true", help="tabulate existing workdirs")
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    opts = parser.parse_args(argv[:split])
    if opts.seeds < 1 or opts.jobs < 1:
        parser.error(f"--seeds={opts.seeds} and --jobs={opts.jobs} must be at least 1")
    if opts.jobs > 1 and opts.launcher == "tpu_pod" and "{run}" not in opts.launcher_args:
        parser.error("--jobs > 1 with --launcher=tpu_pod needs one slice per run: put {run} in "
                     "the slice name, e.g. --launcher-args='--name=abl-{run} ...'")
    if opts.launcher == "tpu_pod" and not opts.workdir.startswith("gs://"):
        parser.error("--launcher=tpu_pod needs a gs:// --workdir (the TPU VMs write there)")
    return opts, argv[split + 1:]


def main(argv: Sequence[str] | None = None) -> int:
    opts, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    axis, values = load_sweep(opts.config)
    values = parse_values(opts.values, values)
    eval_args = shlex.split(opts.eval_args)
    launcher_args = shlex.split(opts.launcher_args)
    runs = plan_runs(opts.workdir, axis, values, opts.seeds)
    try:
        sharing = plan_sharing(runs, opts, axis, overrides)
    except ValueError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    if opts.dry_run:
        for run in runs:
            job = run.name.replace("/", "-")
            if run.name in sharing:
                source, stages = sharing[run.name]
                print(f"# {run.name}: copy {', '.join([*dense_stages.TOWER_FILES, *stages])} "
                      f"of {source} to {run.workdir}")
            print(shlex.join(train_command(
                opts.config, axis, run.value, run.workdir, opts.config_args,
                [*seed_overrides(run.seed), *overrides], "python", opts.launcher,
                for_run(launcher_args, run), job)))
            if not opts.no_eval:
                print(shlex.join(eval_command(run.workdir, eval_args, "python")))
            if opts.routing:
                print(shlex.join(routing_command(run.workdir, "python")))
        return 0
    if opts.collect_only:
        outcomes = [("ok", "skipped" if opts.no_eval else "")] * len(runs)
    else:
        with ThreadPoolExecutor(opts.jobs) as pool:
            # Runs that copy another's dense stages wait for it: sources are submitted first, so
            # a waiting run never holds a slot that its source needs.
            workdirs = {run.workdir for run in runs}
            trained = {s: Future() for s, _ in sharing.values() if s in workdirs}
            futures = {}
            for run in sorted(runs, key=lambda r: r.workdir not in trained):
                shared = sharing.get(run.name)
                source = trained.get(shared[0]) if shared else None
                futures[run.workdir] = pool.submit(execute, run, opts, axis, overrides, eval_args,
                                                   launcher_args, shared, source,
                                                   trained.get(run.workdir))
            outcomes = [futures[run.workdir].result() for run in runs]
    rows = []
    for run, (status, evaluated) in zip(runs, outcomes, strict=True):
        row = {"point": run.point, axis: run.value, "seed": run.seed,
               **collect_point(run.workdir)}
        if status == "ok" and "loss" not in row:
            status = "no metrics"
        has_eval = (epath_of(run.workdir) / EVAL_FILE).exists()
        row.update(status=status, eval=evaluated or ("ok" if has_eval else ""))
        print(f"[sweep] {run.name}: {status}, evaluation: {row['eval'] or '-'}", flush=True)
        rows.append(row)
    root = epath_of(opts.workdir)
    root.mkdir(parents=True, exist_ok=True)
    if opts.seeds == 1:
        write_tables(rows, axis, root)
    else:
        write_tables(rows, axis, root, name="runs", lead=["seed"])
        write_seed_tables(aggregate(rows, axis), axis, root)
    plot(rows, [run.workdir for run in runs], root / "results.png")
    print((root / "results.md").read_text(), end="")
    return int(any(r["status"] != "ok" for r in rows))


if __name__ == "__main__":
    sys.exit(main())
