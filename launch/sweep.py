"""Run an ablation sweep (configs/ablations/*.py) point by point and tabulate the results.

    python launch/sweep.py configs/ablations/experts.py --workdir=runs/ablations/experts \
        [--values=1,8] [--config-args=steps=0.1] [--eval-args=--limit=200] [--no-eval] \
        [--dry-run | --collect-only] [-- --config.data.data_dir=DIR ...]

Each value V of the file's `AXIS` (default: all its `VALUES`) trains
`python -m moe_lvlm.train --config=FILE:AXIS=V[,CONFIG_ARGS] --workdir=WORKDIR/AXIS_V [ARGS]`,
one after the other, then scores it with `python -m moe_lvlm.evaluate --workdir=...` (its JSON
summary is kept in `eval.json`; a failed or missing evaluation is noted in the `eval` column and
leaves the other columns as they are).
`--dry-run` prints those commands, to start them elsewhere (a pod or a cluster, see
docs/launch.md); `--collect-only` tabulates workdirs trained earlier. Writes
`WORKDIR/results.md`, `results.csv` and `results.png` (loss curves and expert load of the last
stage). The exit status is 1 if any point failed to train.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `configs` and `moe_lvlm` importable
    sys.path.insert(0, str(REPO_ROOT))

EVAL_FILE = "eval.json"
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


def point_dir(root: str, axis: str, value: Any) -> str:
    """`root/AXIS_VALUE`, joined as text so that `gs://` roots keep their two slashes."""
    return f"{root.rstrip('/')}/{point_name(axis, value)}"


def point_name(axis: str, value: Any) -> str:
    return f"{axis}_{value}"


def train_command(config: str, axis: str, value: Any, workdir: str, config_args: str,
                  overrides: Sequence[str], python: str = sys.executable) -> list[str]:
    arg = ",".join(filter(None, [f"{axis}={value}", config_args]))
    return [python, "-m", "moe_lvlm.train", f"--config={config}:{arg}",
            f"--workdir={workdir}", *overrides]


def eval_command(workdir: str | Path, eval_args: Sequence[str],
                 python: str = sys.executable) -> list[str]:
    return [python, "-m", "moe_lvlm.evaluate", f"--workdir={workdir}", *eval_args]


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


def evaluate_point(workdir: Path, eval_args: Sequence[str]) -> str:
    """Score a trained point, keeping the summary in `eval.json`; returns 'ok' or why not."""
    if importlib.util.find_spec("moe_lvlm.evaluate") is None:
        return "no moe_lvlm.evaluate"
    log = workdir / "eval.log"
    start = log.stat().st_size if log.exists() else 0
    result = run_logged(eval_command(workdir, eval_args), log)
    summary = last_json_line(log.read_text()[start:])
    if result.returncode != 0 or summary is None:
        return f"failed (exit {result.returncode}, see {log})"
    (workdir / EVAL_FILE).write_text(json.dumps(summary, indent=1))
    return "ok"


# ----------------------------------------------------------------------------- collecting


def read_jsonl(path: Path) -> list[dict]:
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


def collect_point(workdir: Path) -> dict[str, Any]:
    """One table row from a trained workdir (missing parts stay missing)."""
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


# ----------------------------------------------------------------------------- outputs


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def write_tables(rows: list[dict], axis: str, out_dir: Path) -> list[str]:
    """results.csv and results.md; returns the columns."""
    extra = sorted({k for r in rows for k in r if k.startswith("eval/")})
    columns = ["point", axis, "status", "eval", "stage", "step", *RESULT_COLUMNS, *extra]
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    return columns


def plot(rows: list[dict], workdirs: list[Path], out_path: Path) -> None:
    """Loss curves and expert-load imbalance over the last stage, one line per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, load_ax) = plt.subplots(1, 2, figsize=(12, 4))
    for row, workdir in zip(rows, workdirs, strict=True):
        records = read_jsonl(workdir / str(row.get("stage")) / "metrics.jsonl")
        if not records:
            continue
        steps = [r["step"] for r in records]
        loss_ax.plot(steps, [r["loss"] for r in records], label=row["point"])
        loads = [load_imbalance(r) for r in records]
        if loads[0] is not None:
            load_ax.plot(steps, loads, label=row["point"])
    loss_ax.set(xlabel="step", ylabel="loss", title="training loss (last stage)")
    load_ax.set(xlabel="step", ylabel="max expert load x E (1 = balanced)",
                title="expert load imbalance, mean over MoE layers")
    for ax in (loss_ax, load_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="TRAIN_ARGS go to moe_lvlm.train unchanged.",
        usage="%(prog)s CONFIG --workdir=DIR [options] [-- TRAIN_ARGS]")
    parser.add_argument("config", help="a sweep config file, e.g. configs/ablations/experts.py")
    parser.add_argument("--workdir", required=True, help="one subfolder per point goes here")
    parser.add_argument("--values", default=None, help="comma-separated subset of VALUES")
    parser.add_argument("--config-args", default="", help="more key=value config arguments")
    parser.add_argument("--eval-args", default="", help="arguments for moe_lvlm.evaluate")
    parser.add_argument("--no-eval", action="store_true", help="skip moe_lvlm.evaluate")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands only")
    mode.add_argument("--collect-only", action="store_true", help="tabulate existing workdirs")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    opts, overrides = parser.parse_args(argv[:split]), argv[split + 1:]
    axis, values = load_sweep(opts.config)
    values = parse_values(opts.values, values)
    eval_args = shlex.split(opts.eval_args)
    if opts.dry_run:
        for v in values:
            w = point_dir(opts.workdir, axis, v)
            print(shlex.join(train_command(opts.config, axis, v, w, opts.config_args, overrides,
                                           "python")))
            if not opts.no_eval:
                print(shlex.join(eval_command(w, eval_args, "python")))
        return 0
    root = Path(opts.workdir)
    workdirs = [root / point_name(axis, v) for v in values]
    rows = []
    for v, w in zip(values, workdirs, strict=True):
        status, evaluated = "ok", "skipped" if opts.no_eval else ""
        if not opts.collect_only:
            print(f"[sweep] {point_name(axis, v)}: training in {w}", flush=True)
            cmd = train_command(opts.config, axis, v, str(w), opts.config_args, overrides)
            result = run_logged(cmd, w / "train.log")
            if result.returncode != 0:
                status = f"train failed (exit {result.returncode}, see {w / 'train.log'})"
            elif not opts.no_eval:
                evaluated = evaluate_point(w, eval_args)
        row = {"point": point_name(axis, v), axis: v, **collect_point(w)}
        if status == "ok" and "loss" not in row:
            status = "no metrics"
        row.update(status=status, eval=evaluated or ("ok" if (w / EVAL_FILE).exists() else ""))
        print(f"[sweep] {row['point']}: {status}, evaluation: {row['eval'] or '-'}", flush=True)
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    write_tables(rows, axis, root)
    plot(rows, workdirs, root / "results.png")
    print((root / "results.md").read_text(), end="")
    return int(any(r["status"] != "ok" for r in rows))


if __name__ == "__main__":
    sys.exit(main())
