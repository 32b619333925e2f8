"""The MoE FFN against two dense FFNs of the same size: forward + backward time, per dispatch mode.

Default shape (GPU issue 8): E=4 experts, top-2, 8192 tokens (4 x 2048), d=2048, f=5632, SwiGLU,
bf16 compute over fp32 parameters: `MoeFeedForward` (train=True: routing, dispatch, experts,
combine, metrics) against two `DenseFeedForward`s, which do the same useful FLOPs as top-2.
Gradients are taken with respect to the parameters and the input. Also times the three grouped
matmuls of one expert projection ([2T, d] x [E, d, f]: forward, input gradient, weight gradient)
per grouped-matmul implementation, checked against the fp32 jax.lax reference.

  PYTHONPATH=. python benchmarks/moe_layer.py [--modes dropless/xla,dropless/mosaic,capacity]

Modes: 'capacity', or 'dropless/GMM' with GMM one of benchmarks/common.py's GMM_CHOICES: xla
(jax.lax.ragged_dot at XLA's defaults), xla-cudnn (XLA's cuDNN grouped-matmul fusion), triton
(JAX's Pallas-Triton lowering of ragged_dot), mosaic (moe_lvlm/models/grouped_matmul.py's Hopper
kernels). `--kernels` takes the same names.
"""

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402


def reset_triton() -> None:
    import jax

    jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", False)


def layer_fns(args, dispatch: str, gmm: str):
    """(moe_loss, dense_loss, params, x): losses of random cotangent-weighted outputs."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from configs.models import moe_defaults
    from moe_lvlm.models.layers import DenseFeedForward
    from moe_lvlm.models.moe import MoeFeedForward

    cfg = moe_defaults()
    cfg.update(num_experts=args.experts, top_k=args.top_k, dispatch=dispatch)
    cfg.grouped_matmul = gmm
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    moe = MoeFeedForward(ml_collections.FrozenConfigDict(cfg), args.f, **kw)
    dense = DenseFeedForward(args.f, **kw)
    kx, ky, km, kd = jax.random.split(jax.random.PRNGKey(0), 4)
    shape = (args.batch, args.tokens // args.batch, args.d)
    x = jax.random.normal(kx, shape, jnp.bfloat16)
    dy = jax.random.normal(ky, shape, jnp.float32)
    moe_params = moe.init(km, x, train=True)["params"]
    dense_params = [dense.init(k, x)["params"] for k in jax.random.split(kd, args.top_k)]

    def moe_loss(p, x):
        y, metrics = moe.apply({"params": p}, x, train=True)
        return jnp.sum(y.astype(jnp.float32) * dy) + 0.01 * metrics["balance_loss"]

    def dense_loss(ps, x):
        y = sum(dense.apply({"params": p}, x).astype(jnp.float32) for p in ps)
        return jnp.sum(y * dy)

    return moe_loss, dense_loss, moe_params, dense_params, x


def time_grad(loss, params, x, steps: int, options: dict | None = None) -> float:
    import jax

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), compiler_options=options or None)
    jax.block_until_ready(fn(params, x))
    jax.block_until_ready(fn(params, x))
    times = common.median_seconds(lambda: fn(params, x), steps, jax.block_until_ready)
    return common.summarize(times)["median_s"]


def layer_rows(args) -> list[dict]:
    rows, dense_s = [], None
    for mode in filter(None, args.modes.split(",")):
        dispatch, _, gmm = mode.partition("/")
        try:
            impl, options, _ = common.gmm_choice(gmm or "xla")
            moe_loss, dense_loss, mp, dp, x = layer_fns(args, dispatch, impl)
            if dense_s is None:
                dense_s = time_grad(dense_loss, dp, x, args.steps)
            moe_s = time_grad(moe_loss, mp, x, args.steps, options)
            rows.append({"mode": mode, "moe_ms": moe_s * 1e3, "dense_ms": dense_s * 1e3,
                         "ratio": moe_s / dense_s,
                         "tflops": useful_flops(args) / moe_s / 1e12})
        except Exception as e:  # a mode the platform cannot run gets a row saying why
            rows.append({"mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        finally:
            reset_triton()
    if dense_s is not None:
        rows.append({"mode": "2 dense FFNs", "dense_ms": dense_s * 1e3, "ratio": 1.0,
                     "tflops": useful_flops(args) / dense_s / 1e12})
    return rows


def lowered_flops(loss, params, x) -> float:
    import jax

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return fn.lower(params, x).cost_analysis()["flops"]


def count_rows(args) -> list[dict]:
    """XLA's FLOP count of the lowered (unoptimised) forward + backward per mode: no device time,
    so it also runs where the timings cannot be taken."""

    rows, dense_flops = [], None
    for mode in filter(None, args.modes.split(",")):
        dispatch, _, gmm = mode.partition("/")
        impl, _, _ = common.gmm_choice(gmm or "xla")
        reset_triton()
        moe_loss, dense_loss, mp, dp, x = layer_fns(args, dispatch, impl)
        if dense_flops is None:
            dense_flops = lowered_flops(dense_loss, dp, x)
            rows.append({"mode": "2 dense FFNs", "xla_tflop": dense_flops / 1e12, "ratio": 1.0})
        moe_flops = lowered_flops(moe_loss, mp, x)
        rows.append({"mode": mode, "xla_tflop": moe_flops / 1e12, "ratio": moe_flops / dense_flops})
    return rows


def useful_flops(args) -> float:
    """Forward + backward FLOPs of top_k SwiGLU FFNs per token (3 matmuls, x6)."""
    return 6.0 * 3 * args.d * args.f * args.tokens * args.top_k


def kernel_fns(impl: str, options: dict, sizes):
    """Jitted forward, input gradient and weight gradient of one grouped matmul."""
    import jax

    from moe_lvlm.models.grouped_matmul import grouped_matmul

    jit = lambda f: jax.jit(f, compiler_options=options or None)  # noqa: E731

    def fwd(a, b):
        return grouped_matmul(a, b, sizes, impl)

    def grads(a, b, g):
        return jax.vjp(fwd, a, b)[1](g)

    return (jit(fwd), jit(lambda a, b, g: grads(a, b, g)[0]),
            jit(lambda a, b, g: grads(a, b, g)[1]))


def kernel_rows(args) -> list[dict]:
    """Grouped matmul [m, d] x [E, d, f], m = top_k * tokens with random expert sizes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moe_lvlm.models import grouped_matmul as gm

    m = args.top_k * args.tokens
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.integers(0, m, args.experts - 1))
    sizes = jnp.asarray(np.diff(np.concatenate([[0], cuts, [m]])), jnp.int32)
    kx, kw, kd = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(kx, (m, args.d), jnp.bfloat16)
    w = (jax.random.normal(kw, (args.experts, args.d, args.f), jnp.float32)
         / np.sqrt(args.d)).astype(jnp.bfloat16)
    dy = jax.random.normal(kd, (m, args.f), jnp.bfloat16)
    ref_fwd, ref_dx, ref_dw = gm.reference_kernels()
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    refs = {
        "forward": ref_fwd(f32(x), f32(w), sizes),
        "input grad": ref_dx(f32(dy), f32(w), sizes),
        "weight grad": ref_dw(f32(x), f32(dy), sizes),
    }
    flop = 2.0 * m * args.d * args.f
    rows = []
    for impl in filter(None, args.kernels.split(",")):
        try:
            fwd, dx, dw = kernel_fns(*common.gmm_choice(impl)[:2], sizes)
            fns = {"forward": (fwd, (x, w)), "input grad": (dx, (x, w, dy)),
                   "weight grad": (dw, (x, w, dy))}
            for name, (fn, inputs) in fns.items():
                out = fn(*inputs)
                ref = refs[name]
                err = float(jnp.linalg.norm(f32(out) - ref) / jnp.linalg.norm(ref))
                times = common.median_seconds(lambda f=fn, a=inputs: f(*a), args.steps,
                                              jax.block_until_ready)
                s = common.summarize(times)["median_s"]
                rows.append({"impl": impl, "op": name, "ms": s * 1e3, "tflops": flop / s / 1e12,
                             "rel_err": err})
        except Exception as e:
            rows.append({"impl": impl, "op": "-", "error": f"{type(e).__name__}: {str(e)[:300]}"})
        finally:
            reset_triton()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4, help="sequences (capacity groups)")
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--f", type=int, default=5632)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--modes", default="dropless/xla,capacity")
    parser.add_argument("--kernels", default="xla", help="grouped matmuls to time alone ('' none)")
    parser.add_argument("--profile", default="", help="a mode to break down per op")
    parser.add_argument("--json_out", default="", help="also write the rows here")
    parser.add_argument("--count", action="store_true",
                        help="only XLA's FLOP count of each mode's lowered HLO (no timing)")
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")  # before jax starts

    import jax

    if args.count:
        rows = count_rows(args)
        print(f"XLA cost analysis (unoptimised HLO, {jax.default_backend()} lowering), forward + "
              f"backward, E={args.experts} top-{args.top_k}, tokens {args.tokens}, d {args.d}, "
              f"f {args.f}; useful {useful_flops(args) / 1e12:.3f} TFLOP:")
        print(common.table(rows, [("mode", "mode", "s"), ("XLA TFLOP", "xla_tflop", ".3f"),
                                  ("ratio to 2 dense", "ratio", ".3f")]))
        return

    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; E={args.experts} "
          f"top-{args.top_k}, tokens {args.tokens}, d {args.d}, f {args.f}, bf16 compute, "
          f"median of {args.steps}", flush=True)
    kernels = kernel_rows(args) if args.kernels else []
    if kernels:
        print("\ngrouped matmul [top_k*tokens, d] x [E, d, f], one expert projection:")
        print(common.table(kernels, [("impl", "impl", "s"), ("op", "op", "s"),
                                     ("ms", "ms", ".3f"), ("TFLOP/s", "tflops", ".0f"),
                                     ("rel err vs fp32", "rel_err", ".1e"),
                                     ("error", "error", "s")]))
    rows = layer_rows(args)
    print("\nMoE FFN vs two dense FFNs, forward + backward:")
    print(common.table(rows, [("mode", "mode", "s"), ("MoE ms", "moe_ms", ".2f"),
                              ("2 dense ms", "dense_ms", ".2f"), ("ratio", "ratio", ".3f"),
                              ("useful TFLOP/s", "tflops", ".0f"), ("error", "error", "s")]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"kernels": kernels, "layer": rows}, indent=1))
    if args.profile:
        dispatch, _, gmm = args.profile.partition("/")
        impl, options, _ = common.gmm_choice(gmm or "xla")
        moe_loss, _, mp, _, x = layer_fns(args, dispatch, impl)
        fn = jax.jit(jax.value_and_grad(moe_loss, argnums=(0, 1)), compiler_options=options or None)
        jax.block_until_ready(fn(mp, x))
        prof = common.gpu_op_profile(lambda: jax.block_until_ready(fn(mp, x)))
        print(f"\nper-op device time, {args.profile}:")
        print(common.table(prof, [("op", "op", "s"), ("ms", "ms", ".3f"),
                                  ("count", "count", "d"), ("share", "share", ".3f")]))


if __name__ == "__main__":
    main()
