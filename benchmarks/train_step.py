"""Training-step throughput of the LVLM: ours (jit train step) against the PyTorch/HF peer on the
identical architecture (LlavaForConditionalGeneration with the text model that
moe_lvlm/interop/hf_export.py maps our decoder to), one table, one device, one run.

Default shape (GPU issue 8): MoE-LLaVA-1.6Bx4-Top2-like (`moe_llava_1p6bx4` preset with qk-norm,
so that the HF twin is qwen3_moe), sequence 2048, batch 4, one 336px image per row (576 image
tokens), vision frozen, projector + decoder trained with AdamW, bf16 compute. Each system and
variant runs in its own process: a warm-up, then the median of `--steps` device-synchronised
steps. Model FLOPs follow benchmarks/flops.py; MFU is against a bf16 matmul (8192^3 on GPU)
measured by every worker of the run (the table uses the largest).

  PYTHONPATH=. python benchmarks/train_step.py                       # GPU defaults
  PYTHONPATH=. python benchmarks/train_step.py --variant fast:remat=none,gmm=mosaic \
      --variant cap:dispatch=capacity --torch eager,compile
  PYTHONPATH=. python benchmarks/train_step.py --preset tiny --seq 64 --batch 2 --steps 3

Variant keys (ours): attention (xla|cudnn), remat (none|full|dots|dots_no_batch), dispatch
(dropless|capacity), gmm (the grouped matmul of dropless MoE: xla|xla-cudnn|triton|mosaic, see
benchmarks/common.py GMM_CHOICES), param_dtype (float32|bfloat16), xla_flags (extra XLA_FLAGS;
';' separates flags), profile (1: per-op device-time breakdown of one step; on CPU by model part,
forward and backward, from a jax.profiler trace and the ops' source paths).
Torch modes: eager, eager_ckpt, compile, compile_ckpt (ckpt = gradient checkpointing).
"""

import argparse
import functools
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, flops  # noqa: E402

TORCH_MODES = ("eager", "eager_ckpt", "compile", "compile_ckpt")
VARIANT_KEYS = ("attention", "remat", "dispatch", "gmm", "param_dtype", "xla_flags", "profile")
LR = 2e-5


def parse_variant(text: str) -> dict:
    """'name:key=value,key=value' (or 'name') -> {'name': ..., key: value}."""
    name, _, rest = text.partition(":")
    spec = {"name": name}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in VARIANT_KEYS:
            raise SystemExit(f"--variant {text!r}: {item!r} is not key=value with a key in "
                             f"{VARIANT_KEYS}")
        spec[key] = value
    return spec


def gpu_defaults(spec: dict, platform: str) -> dict:
    """Unset keys take the platform's defaults: on GPU cuDNN attention, else the preset's."""
    if platform == "gpu":
        spec = {"attention": "cudnn", **spec}
    return spec


def run_jax(args: argparse.Namespace, spec: dict) -> dict:
    import jax

    gmm, options, _ = common.gmm_choice(spec.get("gmm", "auto"))
    from configs import stages
    from moe_lvlm.models.lvlm import build_model
    from moe_lvlm.train import stages as stages_lib
    from moe_lvlm.train.step import make_optimizer, make_schedule, train_step

    platform = jax.default_backend()
    spec = gpu_defaults(spec, platform)
    cfg = common.model_config(args.preset, args.layers, args.dtype)
    cfg.attention = spec.get("attention", cfg.attention)
    cfg.remat = spec.get("remat", cfg.remat)
    cfg.param_dtype = spec.get("param_dtype", cfg.param_dtype)
    cfg.moe.dispatch = spec.get("dispatch", cfg.moe.dispatch)
    cfg.moe.grouped_matmul = gmm
    model = build_model(cfg)
    trainable = (stages.PROJECTOR, stages.DECODER)
    stage = stages.stage(trainable, LR, args.batch, 1000, "")
    optimizer, schedule = make_optimizer(stage, 1000), make_schedule(stage, 1000)

    rng = jax.random.PRNGKey(0)
    params = common.init_params(model, cfg, rng)
    counts = flops.param_counts(params, cfg.moe.top_k, cfg.moe.num_experts)
    state = jax.jit(lambda p: {
        "step": jax.numpy.zeros((), jax.numpy.int32), "params": p,
        "opt_state": optimizer.init(stages_lib.split_trainable(p, trainable)[0]), "rng": rng,
    }, donate_argnums=(0,))(params)
    del params
    batch = jax.device_put(common.batch_arrays(cfg, args.batch, args.seq))
    step_fn = functools.partial(train_step, model=model, moe_cfg=cfg.moe, optimizer=optimizer,
                                schedule=schedule, trainable=trainable)
    t0 = common.time.perf_counter()
    compiled = jax.jit(step_fn, donate_argnums=(0,), compiler_options=options or None).lower(
        state, batch).compile()
    compile_s = common.time.perf_counter() - t0
    mem = compiled.memory_analysis()
    step_gb = None if mem is None else (
        mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes) / 1e9

    holder = {"state": state}

    def one_step():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch)
        return holder["state"], holder["metrics"]

    sync = jax.block_until_ready
    for _ in range(args.warmup):
        sync(one_step())
    times = common.median_seconds(one_step, args.steps, sync)
    metrics = jax.device_get(holder["metrics"])
    result = {
        **spec, "system": "jax", "platform": platform, "device": str(jax.devices()[0].device_kind),
        "compile_s": round(compile_s, 1), **common.summarize(times),
        "loss": float(metrics["loss"]), "nonfinite": int(metrics["nonfinite"]),
        "params": counts, "peak_gb": common.jax_peak_memory_gb(), "step_gb": step_gb,
        "custom_calls": common.custom_calls(compiled.as_text()),
        "ceiling_tflops": common.jax_matmul_ceiling(8192 if platform == "gpu" else 256),
    }
    if spec.get("profile") == "1" and platform == "cpu":
        result["profile"] = common.cpu_op_profile(lambda: sync(one_step()), compiled.as_text())
    elif spec.get("profile") == "1":
        result["profile"] = common.gpu_op_profile(lambda: sync(one_step()))
    return result


# --------------------------------------------------------------------------- peer
def torch_peer(args: argparse.Namespace, mode: str):
    """The HF peer's AdamW step on `args`' shape in torch `mode` (TORCH_MODES):
    (one_step() -> loss tensor, sync(loss) -> loss, model)."""
    import numpy as np
    import torch
    import transformers

    from moe_lvlm.interop import hf_export

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = common.model_config(args.preset, args.layers, args.dtype)
    config = transformers.LlavaConfig.from_dict(hf_export.llava_config(cfg, {}, args.dtype))
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    with device:
        model = transformers.LlavaForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), weight_decay=0.0,
                                  fused=cuda)
    if mode.endswith("_ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode.startswith("compile"):
        model.compile()

    arrays = common.batch_arrays(cfg, args.batch, args.seq)
    ids = torch.from_numpy(arrays["input_ids"]).long().to(device)
    labels = ids.clone()
    labels[torch.from_numpy(arrays["loss_mask"]).to(device) == 0] = -100
    pixels = torch.from_numpy(np.ascontiguousarray(arrays["images"][:, 0].transpose(0, 3, 1, 2)))
    pixels = pixels.to(device=device, dtype=dtype)

    def one_step():
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync(loss):
        if cuda:
            torch.cuda.synchronize()
        return loss

    return one_step, sync, model


def run_torch(args: argparse.Namespace, spec: dict) -> dict:
    import time

    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    peer_step, sync, model = torch_peer(args, spec["name"])
    last = {}

    def one_step():
        last["loss"] = peer_step()
        return last["loss"]

    t0 = time.perf_counter()
    sync(one_step())
    first_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        sync(one_step())
    times = common.median_seconds(one_step, args.steps, sync)
    loss = float(last["loss"].detach().float().cpu())
    if cuda:
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        mm = common.median_seconds(lambda: a @ b, 10, lambda r: torch.cuda.synchronize())
        ceiling = 2 * 8192**3 / common.statistics.median(mm) / 1e12
    else:
        a = torch.randn(256, 256, dtype=torch.bfloat16)
        mm = common.median_seconds(lambda: a @ a, 10, lambda r: r)
        ceiling = 2 * 256**3 / common.statistics.median(mm) / 1e12
    return {
        **spec, "system": "torch", "platform": device.type,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "compile_s": round(first_s, 1), **common.summarize(times), "loss": loss,
        "hf_params": sum(p.numel() for p in model.parameters()),
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "ceiling_tflops": ceiling, "versions": f"torch {torch.__version__}, "
                                              f"transformers {transformers.__version__}",
    }


# --------------------------------------------------------------------------- table
def finish_rows(rows: list[dict], args: argparse.Namespace) -> float:
    """Adds tokens/s, model TFLOP/s and MFU to every row; returns the ceiling used."""
    cfg = common.model_config(args.preset, args.layers, args.dtype)
    counts = next((r["params"] for r in rows if "params" in r), None)
    ceilings = [r["ceiling_tflops"] for r in rows if r.get("ceiling_tflops")]
    ceiling = max(ceilings) if ceilings else None
    if counts is None:
        return ceiling
    model_flops = flops.train_flops_per_step(counts, cfg, args.batch, args.seq)["total"]
    for r in rows:
        if "median_s" in r:
            r["tokens_s"] = args.batch * args.seq / r["median_s"]
            r["tflops"] = model_flops / r["median_s"] / 1e12
            r["mfu"] = r["tflops"] / ceiling if ceiling else None
    return ceiling


def report(rows: list[dict], args: argparse.Namespace) -> str:
    ceiling = finish_rows(rows, args)
    cfg = common.model_config(args.preset, args.layers, args.dtype)
    counts = next((r["params"] for r in rows if "params" in r), None)
    lines = [f"preset {args.preset} (qk-norm), decoder layers {cfg.decoder.num_layers}, "
             f"seq {args.seq}, batch {args.batch}, {args.dtype} compute, steps {args.steps} "
             f"(median), warm-up {args.warmup}"]
    if counts:
        terms = flops.train_flops_per_step(counts, cfg, args.batch, args.seq)
        lines.append(
            f"params: total {counts['total'] / 1e9:.3f} B, decoder activated (no embedding) "
            f"{counts['decoder_active'] / 1e9:.3f} B, vision {counts['vision'] / 1e9:.3f} B; "
            f"model FLOPs/step {terms['total'] / 1e12:.2f} T "
            + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in terms.items() if k != "total"))
    ceilings = ", ".join(f"{r['system']}/{r['name']} {r['ceiling_tflops']:.3g}"
                         for r in rows if r.get("ceiling_tflops"))
    if ceiling:
        lines.append(f"bf16 matmul ceiling (8192^3 on GPU, 256^3 on CPU) TFLOP/s: {ceilings}; "
                     f"MFU uses {ceiling:.3g}")
    for r in rows:
        detail = ", ".join(f"{k}={r[k]}" for k in VARIANT_KEYS if k in r and k != "profile")
        r["label"] = f"{r['system']}/{r['name']}" + (f" ({detail})" if detail else "")
    lines.append(common.table(rows, [
        ("system / variant", "label", "s"), ("step s", "median_s", ".4f"),
        ("tokens/s", "tokens_s", ",.0f"), ("model TFLOP/s", "tflops", ".1f"),
        ("MFU", "mfu", ".3f"), ("peak GB", "peak_gb", ".1f"),
        ("XLA step GB", "step_gb", ".2f"), ("compile s", "compile_s", ".1f"),
        ("loss", "loss", ".3f")]))
    peers = [r for r in rows if r["system"] == "torch" and "tokens_s" in r]
    if peers:
        best = max(peers, key=lambda r: r["tokens_s"])
        for r in (r for r in rows if r["system"] == "jax" and "tokens_s" in r):
            lines.append(f"ours {r['name']} / best torch ({best['name']}): "
                         f"{r['tokens_s'] / best['tokens_s']:.2f}x tokens/s")
    for r in rows:
        if r.get("custom_calls"):
            lines.append(f"custom calls in {r['label']}: {r['custom_calls']}")
    for r in rows:
        if "error" in r:
            lines.append(f"\n{r['system']}/{r['name']} FAILED: {r['error']}\n{r.get('log', '')}")
        if r.get("profile"):
            lines.append(f"\nper-op device time of one step, {r['label']}:")
            lines.append(common.table(r["profile"], [("op", "op", "s"), ("ms", "ms", ".2f"),
                                                     ("count", "count", "d"),
                                                     ("share", "share", ".3f")]))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="moe_llava_1p6bx4")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0 = preset)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of both systems")
    parser.add_argument("--variant", action="append", default=None,
                        help="ours: name[:key=value,...]; repeatable (default: one 'default')")
    parser.add_argument("--torch", default=",".join(TORCH_MODES),
                        help=f"peer modes, comma-separated, from {TORCH_MODES}; '' for none")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker")
    parser.add_argument("--json_out", default="", help="also write every row here")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        if spec["system"] == "jax":
            from moe_lvlm import host_memory  # noqa: PLC0415

            host_memory.keep_freed_memory()  # as `python -m moe_lvlm.train` does
        runner = run_torch if spec["system"] == "torch" else run_jax
        common.emit_result(runner(args, spec))
        return

    script = str(Path(__file__).resolve())
    passthrough = ["--preset", args.preset, "--layers", str(args.layers), "--seq", str(args.seq),
                   "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--dtype", args.dtype]
    rows = []
    for text in args.variant or ["default"]:
        spec = {**parse_variant(text), "system": "jax"}
        # XLA's GPU client takes 75% of the memory by default: the full-size step needs more.
        env = {"XLA_PYTHON_CLIENT_MEM_FRACTION":
               os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")}
        if spec.get("xla_flags"):
            env["XLA_FLAGS"] = spec["xla_flags"].replace(";", " ")
        rows.append(_run(script, passthrough, spec, env, args.timeout))
    for mode in filter(None, args.torch.split(",")):
        if mode not in TORCH_MODES:
            raise SystemExit(f"--torch {mode!r} is not one of {TORCH_MODES}")
        rows.append(_run(script, passthrough, {"name": mode, "system": "torch"}, {},
                         args.timeout))
    text = report(rows, args)
    print(text, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1, default=str))


def _run(script, passthrough, spec, env, timeout) -> dict:
    print(f"running {spec['system']}/{spec['name']} ...", file=sys.stderr, flush=True)
    result = common.run_worker(script, passthrough, spec, env, timeout)
    print(json.dumps({k: v for k, v in result.items() if k not in ("profile", "log")},
                     default=str), file=sys.stderr, flush=True)
    if "error" in result:
        print(result.get("log", ""), file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    main()
