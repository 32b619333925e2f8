"""Routing analysis of a trained MoE model, as MoE-LLaVA's paper (arXiv 2401.15947, section 4.5)
reports it: which experts the tokens go to, per MoE layer, by modality and by question type, and
the most frequent top-1 expert paths across the decoder's MoE layers.

  python -m moe_lvlm.analyze_routing --workdir=runs/demo --out=runs/demo/routing
      [--stage=stage3] [--step=N] [--split=builtin:test] [--limit=500] [--batch_size=32]

The model reads each record's whole conversation (question and reference answer, encoded as in
training) in evaluation mode; the layers' router choices come out through Flax's `intermediates`
collection (`MoeFeedForward` sows them; training never asks for that collection, so it costs the
train step nothing). Decoder tokens are 'image' (the image placeholders' positions) or 'text';
every token of the vision tower's and projector's MoE layers (CuMo) is an image token.

Writes `routing.json` (every number) and PNG plots: `expert_load.png` (fraction of each layer's
routed (token, choice) pairs per expert, by modality), `question_types.png` (decoder layers'
loads per question type) and `paths.png` (most frequent top-1 paths).
"""

import argparse
import collections
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from moe_lvlm.config import moe_layer_indices, num_image_tokens
from moe_lvlm.data import pipeline, sources
from moe_lvlm.generate import make_encoder
from moe_lvlm.models.lvlm import build_model
from moe_lvlm.workdir import TrainedModel, load_trained

TOP_PATHS = 10


def layer_order(layer: str) -> tuple[int, int]:
    """Sort key of MoE layer paths in the order the tokens meet them."""
    part, _, index = layer.partition("/layers_")
    return ("vision", "projector", "decoder").index(part), int(index or 0)


def batches(
    trained: TrainedModel, split: str, limit: int | None, batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], list[str]]]:
    """(model inputs of `batch_size` rows, each real row's question type) over the first `limit`
    usable records of `split`; the last batch is padded with empty rows (no tokens)."""
    encoder = make_encoder(trained)
    source = sources.open_source(split, trained.config.data.data_dir)
    size = trained.model_config.vision.image_size
    rows: list[list[dict]] = []
    kinds: list[str] = []
    used = 0
    for i in range(len(source)):
        if limit is not None and used >= limit:
            break
        record = source[i]
        encoded = encoder(record)
        if "skip" in encoded:
            continue
        used += 1
        rows.append([encoded])
        kinds.append(record.get("question_type") or "none")
        if len(rows) == batch_size:
            yield pipeline.assemble(rows, batch_size, encoder.seq_len, 1, size), kinds
            rows, kinds = [], []
    if rows:
        yield pipeline.assemble(rows, batch_size, encoder.seq_len, 1, size), kinds


def route_batch(apply_fn, params, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{MoE layer path ('decoder/layers_0', 'vision/layers_1', 'projector'): expert ids
    [rows, tokens, k]} of one batch; `apply_fn` is `routing_fn`'s."""
    _, state = apply_fn(params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                        batch["images"])
    flat = traverse_util.flatten_dict(state["intermediates"], sep="/")
    return {k.removesuffix("/moe/expert_ids"): np.asarray(v[0]) for k, v in flat.items()
            if k.endswith("/moe/expert_ids")}


def routing_fn(model):
    """jit of the evaluation-mode forward that also returns the sown router choices."""
    return jax.jit(lambda p, *inputs: model.apply({"params": p}, *inputs,
                                                  mutable=["intermediates"]))


class Tally:
    """Running counts: per layer and group (modality, question type), routed pairs per expert;
    per modality, top-1 paths across the decoder's MoE layers."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.pairs: dict[str, dict[str, np.ndarray]] = collections.defaultdict(
            lambda: collections.defaultdict(lambda: np.zeros(num_experts, np.int64)))
        self.top1: dict[str, dict[str, np.ndarray]] = collections.defaultdict(
            lambda: collections.defaultdict(lambda: np.zeros(num_experts, np.int64)))
        self.paths: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.tokens: collections.Counter[str] = collections.Counter()

    def _count(self, layer: str, group: str, ids: np.ndarray) -> None:
        """ids [n, k] of n tokens."""
        self.pairs[layer][group] += np.bincount(ids.reshape(-1), minlength=self.num_experts)
        self.top1[layer][group] += np.bincount(ids[:, 0], minlength=self.num_experts)

    def add(self, routed: dict[str, np.ndarray], batch: dict[str, np.ndarray], kinds: list[str],
            image_token_id: int) -> None:
        valid = batch["segment_ids"] > 0
        real = np.arange(valid.shape[0]) < len(kinds)
        is_image = batch["input_ids"] == image_token_id
        used_image = real & is_image.any(1)  # rows whose image the model reads (one per row)
        decoder_layers = sorted((k for k in routed if k.startswith("decoder/")), key=layer_order)
        for layer, ids in routed.items():
            if layer.startswith("decoder/"):
                for modality, mask in (("image", valid & is_image), ("text", valid & ~is_image)):
                    self._count(layer, modality, ids[mask])
                for row, kind in enumerate(kinds):
                    self._count(layer, f"question_type/{kind}", ids[row][valid[row]])
            else:  # vision tower or projector: image rows [rows, tokens, k]
                self._count(layer, "image", ids[used_image].reshape(-1, ids.shape[-1]))
        for modality, mask in (("image", valid & is_image), ("text", valid & ~is_image)):
            self.tokens[modality] += int(mask.sum())
            if decoder_layers:
                paths = np.stack([routed[k][..., 0][mask] for k in decoder_layers], axis=-1)
                self.paths[modality].update(map(tuple, paths.tolist()))

    def summary(self) -> dict[str, Any]:
        def fractions(counts: np.ndarray) -> list[float]:
            return (counts / max(int(counts.sum()), 1)).tolist()

        layers = {}
        for layer in sorted(self.pairs, key=layer_order):
            groups = dict(self.pairs[layer])
            top1 = dict(self.top1[layer])
            if layer.startswith("decoder/"):
                groups["all"] = groups["image"] + groups["text"]
                top1["all"] = top1["image"] + top1["text"]
            layers[layer] = {
                "expert_fraction": {g: fractions(c) for g, c in sorted(groups.items())},
                "top1_fraction": {g: fractions(c) for g, c in sorted(top1.items())},
                "pairs": {g: int(c.sum()) for g, c in sorted(groups.items())},
            }
        paths = {}
        both = self.paths["image"] + self.paths["text"]
        for modality, counter in (("all", both), *sorted(self.paths.items())):
            total = max(sum(counter.values()), 1)
            paths[modality] = [{"path": list(p), "fraction": n / total}
                               for p, n in counter.most_common(TOP_PATHS)]
        return {"tokens": dict(self.tokens), "layers": layers, "top1_paths": paths}


def analyze(trained: TrainedModel, split: str, limit: int | None = None,
            batch_size: int = 32) -> dict[str, Any]:
    """The numbers of `routing.json` for the records of `split`."""
    model_cfg = trained.model_config.copy_and_resolve_references()
    model_cfg.remat = "none"  # intermediates are read in a plain forward
    apply_fn = routing_fn(build_model(model_cfg))
    tally = Tally(model_cfg.moe.num_experts)
    records = 0
    for batch, kinds in batches(trained, split, limit, batch_size):
        tally.add(route_batch(apply_fn, trained.params, batch), batch, kinds,
                  model_cfg.image_token_id)
        records += len(kinds)
    return {"stage": trained.stage, "step": trained.step, "split": split, "records": records,
            "num_experts": model_cfg.moe.num_experts, "top_k": model_cfg.moe.top_k,
            "image_tokens_per_image": num_image_tokens(model_cfg), **tally.summary()}


# --------------------------------------------------------------------------- plots
def plot(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    experts = range(result["num_experts"])
    layers = list(result["layers"])
    written = []

    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.2), squeeze=False,
                             sharey=True)
    for ax, layer in zip(axes[0], layers, strict=True):
        groups = [g for g in ("image", "text") if g in result["layers"][layer]["expert_fraction"]]
        width = 0.8 / len(groups)
        for i, g in enumerate(groups):
            ax.bar(np.array(experts) + (i - (len(groups) - 1) / 2) * width,
                   result["layers"][layer]["expert_fraction"][g], width, label=g)
        ax.axhline(1 / result["num_experts"], color="grey", lw=0.8, ls="--")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(list(experts))
    axes[0, 0].set_ylabel("fraction of routed tokens")
    axes[0, -1].legend(fontsize=8)  # the decoder's layers come last and show both modalities
    fig.suptitle(f"expert load by modality ({result['stage']} step {result['step']})")
    fig.tight_layout()
    written.append(_save(fig, out / "expert_load.png"))

    decoder = [ly for ly in layers if ly.startswith("decoder/")]
    if decoder:
        kinds = sorted({g.split("/", 1)[1] for ly in decoder
                        for g in result["layers"][ly]["expert_fraction"]
                        if g.startswith("question_type/")})
        fig, axes = plt.subplots(1, len(decoder), figsize=(3.2 * len(decoder), 0.4 * len(kinds)
                                                           + 1.6), squeeze=False)
        for ax, layer in zip(axes[0], decoder, strict=True):
            loads = np.array([result["layers"][layer]["expert_fraction"][f"question_type/{k}"]
                              for k in kinds])
            im = ax.imshow(loads, aspect="auto", cmap="viridis", vmin=0)
            ax.set_yticks(range(len(kinds)))
            ax.set_yticklabels(kinds if ax is axes[0, 0] else [])
            ax.set_xticks(list(experts))
            ax.set_xlabel("expert")
            ax.set_title(layer, fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist())
        fig.suptitle("expert load by question type")
        written.append(_save(fig, out / "question_types.png"))

        modalities = [m for m in ("image", "text") if result["top1_paths"].get(m)]
        fig, axes = plt.subplots(1, len(modalities), figsize=(5 * len(modalities), 3.5),
                                 squeeze=False)
        for ax, modality in zip(axes[0], modalities, strict=True):
            top = result["top1_paths"][modality]
            ax.barh(range(len(top)), [p["fraction"] for p in top])
            ax.set_yticks(range(len(top)))
            ax.set_yticklabels(["-".join(map(str, p["path"])) for p in top], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel("fraction of tokens")
            ax.set_title(f"{modality} tokens: top-1 expert paths", fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out / "paths.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a `python -m moe_lvlm.train` workdir")
    parser.add_argument("--out", required=True, help="folder for routing.json and the plots")
    parser.add_argument("--stage", default=None, help="stage to load (default: the last trained)")
    parser.add_argument("--step", type=int, default=None, help="step (default: the newest)")
    parser.add_argument("--split", default=None,
                        help="data source spec or built-in split name (default: data.eval_source)")
    parser.add_argument("--limit", type=int, default=500, help="records to route (0 = all)")
    parser.add_argument("--batch_size", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    trained = load_trained(args.workdir, args.stage, args.step)
    split = args.split or trained.config.data.eval_source
    if ":" not in split:
        split = f"builtin:{split}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not has_moe(trained.model_config):  # e.g. the dense point of an expert-count sweep
        result = {"stage": trained.stage, "step": trained.step, "split": split, "layers": {}}
        print(f"{args.workdir}: stage {trained.stage} has no MoE layer; nothing to analyse")
        plots = []
    else:
        result = analyze(trained, split, args.limit or None, args.batch_size)
        plots = plot(result, out)
    (out / "routing.json").write_text(json.dumps({"workdir": str(args.workdir), **result},
                                                 indent=2) + "\n")
    for path in [out / "routing.json", *plots]:
        print(path)
    return result


def has_moe(model_cfg) -> bool:
    v, d = model_cfg.vision, model_cfg.decoder
    return bool(model_cfg.projector.moe or moe_layer_indices(v.moe_layers, v.depth)
                or moe_layer_indices(d.moe_layers, d.num_layers))


if __name__ == "__main__":
    main()
