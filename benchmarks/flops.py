"""Model FLOP accounting shared by the benchmarks (the issue's convention, not XLA's count).

One training step of the LVLM with the vision tower frozen counts
  6 x activated decoder parameters (non-embedding, experts scaled by top_k / num_experts,
      LM head included) x decoder tokens
+ 6 x layers x seq x embed per decoder token (causal self-attention: QK^T and PV, halved)
+ 6 x projector parameters x image tokens (trained; ~0.1% of the total)
+ 2 x vision parameters x patches (frozen: forward only).
Recomputation (remat) is not counted: these are model FLOPs, not hardware FLOPs.
"""

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ml_collections  # noqa: E402
from flax import traverse_util  # noqa: E402

from moe_lvlm.config import num_patches  # noqa: E402


def param_counts(params: Mapping[str, Any], top_k: int, num_experts: int) -> dict[str, float]:
    """Parameter counts by part from a params tree (arrays or ShapeDtypeStructs).

    Keys: vision, projector, embedding, decoder_active (experts scaled by top_k / num_experts,
    LM head included, embedding excluded), decoder_total, total.
    """
    counts = dict.fromkeys(
        ("vision", "projector", "embedding", "decoder_active", "decoder_total", "total"), 0.0
    )
    for path, leaf in traverse_util.flatten_dict(dict(params), sep="/").items():
        n = float(_size(leaf))
        counts["total"] += n
        part = path.split("/", 1)[0]
        if part in ("vision", "projector"):
            counts[part] += n
        elif path == "decoder/embedding":
            counts["embedding"] += n
            counts["decoder_total"] += n
        else:
            counts["decoder_total"] += n
            counts["decoder_active"] += n * top_k / num_experts if "/moe/experts/" in path else n
    return counts


def _size(leaf) -> int:
    size = 1
    for dim in leaf.shape:
        size *= dim
    return size


def train_flops_per_step(
    counts: Mapping[str, float], model: ml_collections.ConfigDict, batch: int, seq: int,
    images_per_row: int = 1,
) -> dict[str, float]:
    """Model FLOPs of one training step, by term, and their 'total'."""
    d = model.decoder
    tokens = batch * seq
    patches = batch * images_per_row * num_patches(model.vision)
    terms = {
        "decoder": 6.0 * counts["decoder_active"] * tokens,
        "attention": 6.0 * d.num_layers * seq * d.num_heads * d.head_dim * tokens,
        "projector": 6.0 * counts["projector"] * patches,
        "vision": 2.0 * counts["vision"] * patches,
    }
    terms["total"] = sum(terms.values())
    return terms


# --------------------------------------------------------------------------- CLI
def abstract_params(model, model_cfg: ml_collections.ConfigDict):
    """ShapeDtypeStructs of the model's parameters (nothing is computed)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    size = model_cfg.vision.image_size
    dummy = (jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32),
             jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 1, size, size, 3), jnp.float32))
    return nn.meta.unbox(
        jax.eval_shape(lambda r: model.init(r, *dummy)["params"], jax.random.PRNGKey(0))
    )


def byte_floor(counts: Mapping[str, float], model: ml_collections.ConfigDict, batch: int,
               seq: int) -> dict[str, float]:
    """The fewest bytes some memory-bound parts of one step must move (each tensor read or
    written once), fp32 master weights and AdamW state, bf16 compute:
      optimizer: global-norm read of the grads + AdamW (read p, g, m, v; write p, m, v), fp32
      weight_casts: fp32 -> bf16 copy of every weight per step (read 4 + write 2 bytes)
      logits: bf16 logits written and read, fp32 logit gradient written and read once each
    """
    trainable = counts["decoder_total"] + counts["projector"]
    tokens, vocab = batch * seq, model.decoder.vocab_size
    return {
        "optimizer": trainable * (4 + 16 + 12),
        "weight_casts": counts["total"] * 6,
        "logits": tokens * vocab * (2 + 2 + 4 + 4),
    }


def main(argv=None) -> None:
    import argparse
    import functools

    parser = argparse.ArgumentParser(
        description="Parameter, FLOP and byte accounting of one training step; with --hlo, "
                    "XLA's FLOP count of the lowered (unoptimised) step per variant.")
    parser.add_argument("--preset", default="moe_llava_1p6bx4")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--peer_tokens_s", type=float, default=29178.0,
                        help="the compiled peer's tokens/s to beat by 1.2x (issue 8)")
    parser.add_argument("--ceiling", type=float, default=786.0,
                        help="matmul ceiling TFLOP/s for the MFU target (issue 8's peer run)")
    parser.add_argument("--hlo", default="",
                        help="variants 'dispatch/remat,...' to lower and count, e.g. "
                             "dropless/none,capacity/full")
    args = parser.parse_args(argv)

    import jax

    from benchmarks import common
    from moe_lvlm.models.lvlm import build_model

    cfg = common.model_config(args.preset, args.layers)
    counts = param_counts(abstract_params(build_model(cfg), cfg), cfg.moe.top_k,
                          cfg.moe.num_experts)
    terms = train_flops_per_step(counts, cfg, args.batch, args.seq)
    tokens = args.batch * args.seq
    print(f"{args.preset} (qk-norm), seq {args.seq}, batch {args.batch} ({tokens} tokens)")
    print("parameters (B): " + ", ".join(f"{k} {v / 1e9:.4f}" for k, v in counts.items()))
    print("model TFLOP per step: " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in terms.items())
          + f"; {terms['total'] / tokens / 1e9:.3f} GFLOP per token")
    target = 1.2 * args.peer_tokens_s
    print(f"1.2x the peer ({args.peer_tokens_s:,.0f} tokens/s) = {target:,.0f} tokens/s = "
          f"{tokens / target:.4f} s/step = {terms['total'] * target / tokens / 1e12:.1f} model "
          f"TFLOP/s = MFU {terms['total'] * target / tokens / 1e12 / args.ceiling:.3f} of "
          f"{args.ceiling:.0f}; MFU 0.53 = {0.53 * args.ceiling:.1f} TFLOP/s = "
          f"{terms['total'] / (0.53 * args.ceiling * 1e12):.4f} s/step")
    floor = byte_floor(counts, cfg, args.batch, args.seq)
    print("byte floor per step (GB): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in floor.items())
          + f", sum {sum(floor.values()) / 1e9:.1f}")
    if not args.hlo:
        return

    from configs import stages
    from moe_lvlm.train import stages as stages_lib
    from moe_lvlm.train.step import make_optimizer, make_schedule, train_step

    trainable = (stages.PROJECTOR, stages.DECODER)
    stage = stages.stage(trainable, 2e-5, args.batch, 1000, "")
    optimizer, schedule = make_optimizer(stage, 1000), make_schedule(stage, 1000)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in common.batch_arrays(cfg, args.batch, args.seq).items()}
    print(f"XLA cost analysis of the lowered step on {jax.default_backend()} (attention "
          f"{cfg.attention}; unoptimised HLO, remat recomputation included):")
    for variant in args.hlo.split(","):
        dispatch, _, remat = variant.partition("/")
        cfg.moe.dispatch, cfg.remat = dispatch, remat or "none"
        model = build_model(cfg)
        params = abstract_params(model, cfg)
        state = {
            "step": jax.ShapeDtypeStruct((), "int32"), "params": params,
            "opt_state": jax.eval_shape(
                lambda p: optimizer.init(stages_lib.split_trainable(p, trainable)[0]), params),
            "rng": jax.ShapeDtypeStruct((2,), "uint32"),
        }
        step = functools.partial(train_step, model=model, moe_cfg=cfg.moe, optimizer=optimizer,
                                 schedule=schedule, trainable=trainable)
        cost = jax.jit(step).lower(state, batch).cost_analysis()
        print(f"  {variant}: {cost['flops'] / 1e12:.2f} TFLOP = "
              f"{cost['flops'] / terms['total']:.3f} x model FLOPs")


if __name__ == "__main__":
    main()
