"""Time the platform kernels against XLA: attention, the grouped matmul and dropless dispatch.

    PYTHONPATH=. python benchmarks/kernels.py                      # TPU or GPU, default shapes
    PYTHONPATH=. python benchmarks/kernels.py --smoke --cpu_devices=4   # tiny, CPU (interpret)

Forward + backward of each, median of `--steps` after one warm-up call, with the largest
difference from the first (reference) implementation relative to its largest value:

- attention, causal over [batch, seq, heads (kv_heads), head_dim] (`--packed`: two segments per
  row): `xla` against `blockwise`, `native` (CPU's default, the C++ kernel of moe_lvlm/kernels/),
  `splash` (TPU; Pallas interpret mode on CPU) and `cudnn` (GPU, not packed).
- grouped matmul [tokens * top_k, d] x [E, d, f], random routing: `xla` (jax.lax.ragged_dot)
  against `tiled` (CPU's default), `megablox` (TPU; interpret on CPU) and `mosaic` (Hopper GPUs).
- dropless MoE layer (SwiGLU experts, expert axis = min(E, devices), the rest data) with
  `moe.ep_dispatch` `all_gather` against `ragged_a2a` (GPU/TPU) and `a2a_buffer`; needs > 1
  device.
- LM head + cross-entropy, [lm_tokens, d] x [d, vocab]: `xla` (logits, then the loss) against,
  on CPU, `native` (the fused kernel, per-thread dW buffers) and `native_split` (its dW split by
  vocabulary columns, as above `native_lm_loss.GRAD_BUFFER_BYTES`).

On CPU the Pallas kernels run in interpret mode: the smoke run checks that everything runs and
agrees, its times mean nothing.
"""

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn: Callable, args: tuple, steps: int) -> tuple[float, object]:
    """Median seconds of `fn(*args)` (compiled, synchronised) and its value."""
    import statistics

    import jax

    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def rel_err(got, want) -> float:
    import jax
    import numpy as np

    worst = 0.0
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        worst = max(worst, float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)))
    return worst


def compare(section: str, shape: str, impls: dict[str, Callable], args: tuple, steps: int,
            flops: float) -> list[dict]:
    """One row per implementation; the first is the reference."""
    import jax

    rows, ref = [], None
    for name, fn in impls.items():
        row = {"section": section, "impl": name, "shape": shape}
        try:
            seconds, out = timed(jax.jit(fn), args, steps)
            ref = out if ref is None else ref
            row.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12, rel_err=rel_err(out, ref))
        except Exception as e:  # noqa: BLE001  (a kernel this device lacks: one error row)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row)
    return rows


def attention_rows(a, platform: str, dtype) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from moe_lvlm.models.attention import self_attention

    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (a.batch, a.seq, a.heads, a.head_dim), dtype)
    k, v = (jax.random.normal(kk, (a.batch, a.seq, a.kv_heads, a.head_dim), dtype)
            for kk in keys[1:3])
    ct = jax.random.normal(keys[3], q.shape, dtype)
    seg = jnp.ones((a.batch, a.seq), jnp.int32)
    if a.packed:
        seg = seg.at[:, a.seq // 2:].set(2)

    def fwd_bwd(attend):
        def loss(q, k, v):
            return jnp.sum(attend(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))
        return lambda q, k, v: jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    names = ["xla", "blockwise"]
    if platform == "cpu":
        names.append("native")
    if platform == "gpu" and not a.packed:
        names.append("cudnn")
    if platform in ("tpu", "cpu"):
        names.append("splash")
    impls = {name: fwd_bwd(functools.partial(
        self_attention, segment_ids=seg if a.packed else None, causal=True, implementation=name))
        for name in names}
    # Causal: half the score matrix; forward 2 matmuls, backward 4 (x 2 FLOP per MAC).
    flops = 3 * 2 * 2 * a.batch * a.heads * a.seq * a.seq * a.head_dim / 2
    shape = (f"b{a.batch} s{a.seq} h{a.heads}/{a.kv_heads} d{a.head_dim}"
             f"{' packed' if a.packed else ''}")
    return compare("attention", shape, impls, (q, k, v), a.steps, flops)


def routing(a, tokens: int):
    import jax
    import jax.numpy as jnp

    logits = jax.random.normal(jax.random.key(1), (tokens, a.experts))
    ids = jax.lax.top_k(logits, a.top_k)[1].astype(jnp.int32)
    combine = jax.nn.softmax(jax.random.normal(jax.random.key(2), (tokens, a.top_k)), -1)
    return ids, combine


def grouped_matmul_rows(a, platform: str, dtype) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from moe_lvlm.models.grouped_matmul import grouped_matmul

    ids, _ = routing(a, a.tokens)
    flat = jnp.sort(ids.reshape(-1))
    sizes = jnp.bincount(flat, length=a.experts).astype(jnp.int32)
    m = flat.shape[0]
    x = jax.random.normal(jax.random.key(3), (m, a.d), dtype)
    w = (jax.random.normal(jax.random.key(4), (a.experts, a.d, a.f)) * a.d**-0.5).astype(dtype)

    def fwd_bwd(impl):
        def loss(x, w):
            return jnp.sum(grouped_matmul(x, w, sizes, impl).astype(jnp.float32) ** 2)
        return lambda x, w: jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    extra = {"tpu": ["megablox"], "cpu": ["tiled", "megablox"], "gpu": ["tiled", "mosaic"]}
    names = ["xla"] + extra[platform]
    return compare("grouped matmul", f"m{m} d{a.d} f{a.f} E{a.experts}",
                   {n: fwd_bwd(n) for n in names}, (x, w), a.steps, 3 * 2 * m * a.d * a.f)


def dispatch_rows(a, platform: str, dtype) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from moe_lvlm.models.dropless_ep import dropless_expert_parallel
    from moe_lvlm.models.moe import dropless_moe, experts_grouped

    n = jax.device_count()
    x_axis = min(a.experts, n)
    if n == 1 or n % x_axis or a.experts % x_axis:
        return [{"section": "dropless dispatch", "impl": "-", "shape": f"{n} device(s)",
                 "error": "needs > 1 device, expert axis dividing devices and experts"}]
    mesh = jax.make_mesh((n // x_axis, x_axis), ("data", "expert"),
                         axis_types=(AxisType.Auto,) * 2)
    tokens = a.tokens * n  # a.tokens per device
    ids, combine = routing(a, tokens)
    x = jax.random.normal(jax.random.key(5), (tokens, a.d), dtype)
    scale = lambda fan: fan**-0.5  # noqa: E731
    w = {name: (jax.random.normal(jax.random.key(i), shape) * scale(shape[1])).astype(dtype)
         for i, (name, shape) in enumerate(
             [("gate", (a.experts, a.d, a.f)), ("up", (a.experts, a.d, a.f)),
              ("down", (a.experts, a.f, a.d))])}
    gmm = "auto"
    names = tuple(w)  # jax rebuilds dicts in sorted key order: index them by name
    batch_spec = P(("data", "expert"))

    def layer(mode):
        def body(x, ids, combine, *wv):
            wl = dict(zip(names, wv, strict=True))
            if mode == "all_gather":
                return dropless_moe(wl, x, ids, combine, "silu", True, gmm)
            compute = functools.partial(experts_grouped, wl, activation="silu", gated=True,
                                        gmm=gmm)
            return dropless_expert_parallel(compute, x, ids, combine, a.experts, "expert", mode)

        weight_spec = P() if mode == "all_gather" else P("expert")
        fn = jax.shard_map(body, mesh=mesh, in_specs=(batch_spec,) * 3 + (weight_spec,) * 3,
                           out_specs=batch_spec, check_vma=False)

        def loss(x, w):
            return jnp.sum(fn(x, ids, combine, *(w[n] for n in names)).astype(jnp.float32) ** 2)
        return lambda x, w: jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    x = jax.device_put(x, NamedSharding(mesh, batch_spec))
    w = {k: jax.device_put(v, NamedSharding(mesh, P("expert"))) for k, v in w.items()}
    ids, combine = (jax.device_put(t, NamedSharding(mesh, batch_spec)) for t in (ids, combine))
    modes = ["all_gather", "a2a_buffer"] + ([] if platform == "cpu" else ["ragged_a2a"])
    flops = 3 * 2 * 3 * tokens * a.top_k * a.d * a.f / n
    return compare("dropless dispatch", f"{a.tokens} tok/dev k{a.top_k} d{a.d} f{a.f} "
                   f"E{a.experts}, mesh data {n // x_axis} x expert {x_axis}",
                   {m: layer(m) for m in modes}, (x, w), a.steps, flops)


def lm_loss_rows(a, platform: str, dtype) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from moe_lvlm.kernels import native_lm_loss

    keys = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(keys[0], (a.lm_tokens, a.d), jnp.float32)
    head = jax.random.normal(keys[1], (a.d, a.vocab), jnp.float32) * a.d**-0.5
    bias = jnp.zeros(a.vocab, jnp.float32)
    targets = jax.random.randint(keys[2], (a.lm_tokens,), 0, a.vocab)
    weights = jnp.ones(a.lm_tokens, jnp.float32)

    def xla(x_, head_, bias_):
        logits = x_ @ head_ + bias_
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]
        return jnp.sum(nll * weights)

    def native(budget):
        return lambda x_, head_, bias_: native_lm_loss.weighted_nll_sum(
            x_, head_, bias_, targets, weights, grad_buffer_bytes=budget)

    impls = {"xla": xla}
    if platform == "cpu":
        impls.update(native=native(native_lm_loss.GRAD_BUFFER_BYTES), native_split=native(0))
    grads = {name: jax.value_and_grad(fn, argnums=(0, 1, 2))
             for name, fn in impls.items()}
    return compare("lm loss", f"n{a.lm_tokens} d{a.d} V{a.vocab}", grads, (x, head, bias),
                   a.steps, 3 * 2 * a.lm_tokens * a.d * a.vocab)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--smoke", action="store_true", help="tiny shapes (CPU check that everything runs)")
    add("--cpu_devices", type=int, default=0, help="fake CPU devices (dispatch rows on CPU)")
    add("--sections", default="attention,grouped_matmul,dispatch,lm_loss")
    add("--batch", type=int, default=4)
    add("--seq", type=int, default=4096)
    add("--heads", type=int, default=32)
    add("--kv_heads", type=int, default=8)
    add("--head_dim", type=int, default=128)
    add("--packed", action="store_true", help="two segments per row (segment ids)")
    add("--tokens", type=int, default=8192, help="tokens (per device for dispatch)")
    add("--experts", type=int, default=8)
    add("--top_k", type=int, default=2)
    add("--d", type=int, default=4096)
    add("--f", type=int, default=14336)
    add("--lm_tokens", type=int, default=8192, help="tokens of the lm_loss section")
    add("--vocab", type=int, default=32000)
    add("--steps", type=int, default=10)
    add("--json_out", default="")
    a = parser.parse_args(argv)
    if a.smoke:
        a.batch, a.seq, a.heads, a.kv_heads, a.head_dim = 1, 256, 2, 1, 32
        a.tokens, a.experts, a.d, a.f, a.steps = 64, 4, 32, 64, 1
        a.lm_tokens, a.vocab = 101, 300

    import jax

    if a.cpu_devices:
        jax.config.update("jax_num_cpu_devices", a.cpu_devices)
    import jax.numpy as jnp

    from benchmarks.common import table

    platform = jax.default_backend()
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    sections = {"attention": attention_rows, "grouped_matmul": grouped_matmul_rows,
                "dispatch": dispatch_rows, "lm_loss": lm_loss_rows}
    rows = []
    for name in a.sections.split(","):
        rows += sections[name](a, platform, dtype)
    print(f"{jax.devices()[0].device_kind} x {jax.device_count()} ({platform}), "
          f"{jnp.dtype(dtype).name}, forward + backward, median of {a.steps}")
    print(table(rows, [("section", "section", "s"), ("impl", "impl", "s"), ("shape", "shape", "s"),
                       ("ms", "ms", ".3f"), ("TFLOP/s", "tflops", ".2f"),
                       ("rel. diff", "rel_err", ".1e"), ("error", "error", "s")]))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
