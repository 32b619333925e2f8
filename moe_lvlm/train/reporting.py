"""Metrics out of the loop: console progress line, JSONL file, TensorBoard events, stage plots.

Only the main process writes; the others get a writer that does nothing.
"""

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def scalarize(metrics: dict[str, Any]) -> dict[str, Any]:
    """Host values: scalars as floats, vectors (expert fractions) as lists."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = a.item() if a.ndim == 0 else a.tolist()
    return out


class MetricsWriter:
    """Writes `{directory}/metrics.jsonl` and `{directory}/tensorboard/` for steps after
    `start_step`: records of later steps (from a run that was interrupted and is now resumed
    from the checkpoint at `start_step`) are dropped first, so each step appears once."""

    def __init__(self, directory: Path, stage: str, total_steps: int, start_step: int = 0,
                 enabled: bool = True):
        self.enabled = enabled
        self.stage = stage
        self.total_steps = total_steps
        self.path = Path(directory) / "metrics.jsonl"
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            Path(directory).mkdir(parents=True, exist_ok=True)
            kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            # purge_step: TensorBoard discards the earlier run's events from that step on.
            self.tb = SummaryWriter(str(Path(directory) / "tensorboard"),
                                    purge_step=start_step + 1)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"stage": self.stage, "step": step, "time": time.time(), **scalarize(metrics)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k in ("stage", "step", "time"):
                continue
            if isinstance(v, list):
                for i, x in enumerate(v):
                    self.tb.add_scalar(f"{self.stage}/{k}/{i}", x, step)
            else:
                self.tb.add_scalar(f"{self.stage}/{k}", v, step)
        self.tb.flush()
        self._console(step, record)

    def _console(self, step: int, r: dict[str, Any]) -> None:
        width = 20
        done = int(width * step / max(self.total_steps, 1))
        bar = "#" * done + "." * (width - done)
        parts = [f"{self.stage} [{bar}] {step}/{self.total_steps}", f"loss {r['loss']:.4f}"]
        parts += [f"ce {r['ce']:.4f}", f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}"]
        if "tokens_per_s" in r:
            parts.append(f"{r['tokens_per_s']:.0f} tok/s")
        if r.get("balance_loss"):
            parts.append(f"bal {r['balance_loss']:.4f}")
        if r.get("nonfinite_steps"):
            parts.append(f"non-finite steps {r['nonfinite_steps']}")
        if r.get("skipped_records"):
            parts.append(f"skipped {r['skipped_records']}")
        print("  ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_stage(records: list[dict[str, Any]], out_path: Path) -> None:
    """PNG with the loss curve and, for MoE stages, each MoE layer's expert load (the fraction
    of routed tokens each expert received, averaged over the stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    load_keys = sorted(k for k in records[-1] if k.endswith("/expert_fraction"))
    ncols = 1 + bool(load_keys)
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    steps = [r["step"] for r in records]
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in records], label="loss")
    ax.plot(steps, [r["ce"] for r in records], label="cross-entropy")
    ax.set_xlabel("step")
    ax.set_title(f"{records[-1]['stage']}: loss")
    ax.legend()
    if load_keys:
        ax = axes[0, 1]
        # [layers, experts], averaged over the stage's log steps
        loads = np.array([np.mean([r[k] for r in records], axis=0) for k in load_keys])
        im = ax.imshow(loads, aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks(range(len(load_keys)))
        ax.set_yticklabels(["/".join(k.split("/")[1:3]) for k in load_keys])
        ax.set_xlabel("expert")
        ax.set_title("fraction of routed tokens per expert (stage mean)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
