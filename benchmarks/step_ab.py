"""Interleaved A/B of training-step variants: each variant is compiled in its own worker
process (so XLA flags may differ), then the workers take one step each in turn, round after
round, only one running at a time; each variant's median is reported with its speed relative to
the first. On a shared box absolute times drift with the load, but variants timed alternately
see the same load: their ratios are what to read.

  PYTHONPATH=. python benchmarks/step_ab.py --shape demo3 \
      --variant base --variant dense:moe.expert_compute=dense --rounds 7
  PYTHONPATH=. python benchmarks/step_ab.py --shape tiny:4:256:8 --variant base \
      --variant xla:attention=xla --variant fm:xla_flags=--xla_cpu_enable_fast_math=true
  PYTHONPATH=. python benchmarks/step_ab.py --shape tiny:8:1024:8 --variant ours \
      --variant eager:torch=eager --variant compile:torch=compile --rounds 7

Shapes: `demo2` / `demo3` are the demo's stage II (dense model, 32 x 80 tokens) and stage III
(MoE, 32 x 40, FFNs + projector trained) steps as the demo's loop builds them (configs/demo.py:
its model, stage optimizer and mesh; synthetic batch); `tiny:LAYERS:SEQ:BATCH` is
train_step.py's CPU shape (preset tiny with qk-norm, projector + decoder trained), data-parallel
over the worker's devices (one unless its XLA_FLAGS say `--xla_force_host_platform_device_count`).
Variant keys:
`torch` (eager | compile | eager_ckpt | compile_ckpt: the PyTorch/HF peer of train_step.py
instead of ours, `tiny` shapes only: ours against PyTorch timed alternately, which a box whose
speed drifts minute to minute needs); dotted fields of the model config (`attention`,
`moe.dispatch`, `moe.expert_compute`, ...);
for demo shapes `demo.ARG` (an argument of configs/demo.py, e.g. `demo.dispatch`); `xla_flags`
(the worker's XLA_FLAGS, ';'-separated); `malloc` (`tuned`: glibc malloc keeps freed memory,
moe_lvlm/host_memory.py, as the training command sets it, the default for ours; `default`:
glibc's defaults, the default for the PyTorch peer); `root` (another checkout of the
repository, e.g. from `git worktree add /tmp/before HEAD~1`, whose model and training code the
worker imports: a before/after comparison of a code change).
"""

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if os.environ.get("STEP_AB_ROOT"):  # a worker of a `root=` variant: that checkout's code
    sys.path.insert(0, os.environ["STEP_AB_ROOT"])

from benchmarks import common  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:a.b=v,c=w' -> (name, {'a.b': v, 'c': w}), values as int/float/bool when they
    parse as such."""
    name, _, rest = text.partition(":")
    fields = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: {item!r} is not key=value")
        fields[key] = _value(value)
    return name, fields


def _value(text: str):
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_step(shape: str, fields: dict):
    """(compiled step, state, batch, tokens per step) of one variant."""
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moe_lvlm.models.lvlm import build_model
    from moe_lvlm.parallel.mesh import (
        BATCH_AXES,
        MESH_AXES,
        logical_shardings,
        make_mesh,
        sharding_context,
    )
    from moe_lvlm.train import loop
    from moe_lvlm.train import stages as stages_lib
    from moe_lvlm.train.step import jit_train_step, make_optimizer, make_schedule, train_step

    model_fields = {k: v for k, v in fields.items() if not k.startswith("demo.")}
    if shape.startswith("demo"):
        from configs import demo
        from moe_lvlm.config import validate

        arg = ",".join(f"{k[5:]}={v}" for k, v in fields.items() if k.startswith("demo."))
        cfg = demo.get_config(arg or None)
        name = {"demo2": "stage2", "demo3": "stage3"}[shape]
        names = loop.stage_names(cfg)
        model_cfg = stages_lib.stage_model(cfg, names, name)
        stage = cfg[name]
        seq = stage.get("seq_len", 0) or cfg.data.seq_len
        batch_size = stage.batch_size
        mesh = make_mesh(validate(cfg, jax.device_count()))
    else:
        from configs import stages

        _, layers, seq, batch_size = shape.split(":")
        seq, batch_size = int(seq), int(batch_size)
        model_cfg = common.model_config("tiny", int(layers), "float32")
        stage = stages.stage((stages.PROJECTOR, stages.DECODER), 2e-5, batch_size, 1000, "")
        mesh = make_mesh((jax.device_count(),) + (1,) * (len(MESH_AXES) - 1))
    for key, value in model_fields.items():
        _set(model_cfg, key, value)
    model_cfg.image_token_id = model_cfg.decoder.vocab_size - 1
    model = build_model(model_cfg, mesh)
    optimizer, schedule = make_optimizer(stage, 1000), make_schedule(stage, 1000)
    init = loop.state_initializer(model, optimizer, stage.trainable, model_cfg, seq, 1,
                                  loop.batch_divisor(mesh))
    with sharding_context(mesh):  # as the demo's loop
        boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
        shardings = logical_shardings(nn.get_partition_spec(boxed), mesh)
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(
            jax.random.PRNGKey(0))
        step_fn = functools.partial(
            train_step, model=model, moe_cfg=model_cfg.moe, optimizer=optimizer,
            schedule=schedule, trainable=tuple(stage.trainable),
            accum=stage.get("grad_accum", 1), mesh=mesh)
        batch = jax.device_put(common.batch_arrays(model_cfg, batch_size, seq),
                               NamedSharding(mesh, P(BATCH_AXES)))
        compiled = jit_train_step(step_fn, shardings, mesh).lower(state, batch).compile()
    return compiled, state, batch, batch_size * seq


def _set(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        cfg = cfg[p]
    if leaf not in cfg:
        raise SystemExit(f"model config has no field {dotted!r}")
    cfg[leaf] = value


def build_torch_step(shape: str, mode: str):
    """The PyTorch/HF peer of a `tiny:LAYERS:SEQ:BATCH` shape (train_step.py's, fp32) in torch
    `mode`: (one_step() -> loss, tokens)."""
    from benchmarks import train_step

    if not shape.startswith("tiny:"):
        raise SystemExit(f"torch variants need a tiny:LAYERS:SEQ:BATCH shape, not {shape!r}")
    _, layers, seq, batch_size = shape.split(":")
    args = argparse.Namespace(preset="tiny", layers=int(layers), seq=int(seq),
                              batch=int(batch_size), dtype="float32")
    step, sync, _ = train_step.torch_peer(args, mode)
    return lambda: float(sync(step()).detach()), args.batch * args.seq


def worker(shape: str, fields: dict) -> None:
    """Compiles the variant, then takes one step per 'step' line on stdin, answering each with
    'STEP seconds loss'."""
    # As `python -m moe_lvlm.train` does; the PyTorch peer runs as stock PyTorch does unless
    # `malloc=tuned`. (A `root` checkout older than host_memory.py runs glibc's defaults.)
    if os.environ.get("STEP_AB_MALLOC", "default" if "torch" in fields else "tuned") == "tuned":
        with contextlib.suppress(ImportError):
            from moe_lvlm import host_memory

            host_memory.keep_freed_memory()
    import jax

    t0 = time.perf_counter()
    if "torch" in fields:
        torch_step, tokens = build_torch_step(shape, fields["torch"])
        torch_step()  # torch.compile compiles here
        print(f"READY {time.perf_counter() - t0:.1f} {tokens}", flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            t0 = time.perf_counter()
            loss = torch_step()
            print(f"STEP {time.perf_counter() - t0:.6f} {loss:.6f}", flush=True)
        return
    compiled, state, batch, tokens = build_step(shape, fields)
    print(f"READY {time.perf_counter() - t0:.1f} {tokens}", flush=True)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return jax.block_until_ready(metrics)

    for line in sys.stdin:
        if line.strip() == "profile":
            rows = common.cpu_op_profile(one_step, compiled.as_text())
            print("PROFILE " + json.dumps(rows), flush=True)
        elif line.strip() == "step":
            t0 = time.perf_counter()
            metrics = one_step()
            print(f"STEP {time.perf_counter() - t0:.6f} {float(metrics['loss']):.6f}", flush=True)
        else:
            break


def _read(proc, prefix: str, name: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix + " "):
            return line[len(prefix) + 1:].strip()
    raise SystemExit(f"variant {name}: worker exited ({proc.wait()})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="demo3", help="demo2, demo3 or tiny:LAYERS:SEQ:BATCH")
    parser.add_argument("--variant", action="append", default=None,
                        help="name[:field=value,...]; repeatable; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true",
                        help="after the rounds, each variant's time of one step by model part "
                             "and its costliest ops (train_step.py's CPU profile)")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.shape, json.loads(args.worker))

    variants = [parse_variant(v) for v in args.variant or ["default"]]
    procs = {}
    for name, fields in variants:  # compiled one after the other, not competing for the cores
        fields = dict(fields)
        env = {**os.environ, "PYTHONPATH": f"{common.ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        if "root" in fields:
            env["STEP_AB_ROOT"] = str(Path(fields.pop("root")).resolve())
        if "malloc" in fields:
            env["STEP_AB_MALLOC"] = str(fields.pop("malloc"))
        flags = str(fields.pop("xla_flags", "")).replace(";", " ")
        env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags]))
        procs[name] = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--shape", args.shape,
             "--worker", json.dumps(fields)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        compile_s, tokens = _read(procs[name], "READY", name).split()
        procs[name].tokens = int(tokens)
        print(f"{name}: built and compiled in {compile_s} s", file=sys.stderr, flush=True)
    times = {name: [] for name in procs}
    losses = {}
    for r in range(args.warmup + args.rounds):
        for name, proc in procs.items():
            proc.stdin.write("step\n")
            proc.stdin.flush()
            seconds, loss = _read(proc, "STEP", name).split()
            if r >= args.warmup:
                times[name].append(float(seconds))
                losses.setdefault(name, float(loss))
    profiles = {}
    for name, proc in procs.items():
        if args.profile:
            proc.stdin.write("profile\n")
            proc.stdin.flush()
            profiles[name] = json.loads(_read(proc, "PROFILE", name))
        proc.stdin.close()
        proc.wait()
    base = statistics.median(times[variants[0][0]])
    print(f"shape {args.shape}: {args.rounds} interleaved rounds after {args.warmup} warm-up "
          "steps each (loss: the first timed step's)")
    print("| variant | median s | min s | tokens/s | speed vs first | loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, _ in variants:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.4f} | {min(times[name]):.4f} | {procs[name].tokens / med:,.0f} "
              f"| {base / med:.2f}x | {losses[name]:.6f} |")
    for name, rows in profiles.items():
        print(f"\none step of {name} (ms summed over XLA ops by model part, then single ops):")
        print(common.table(rows, [("op", "op", "s"), ("ms", "ms", ".2f"),
                                  ("share", "share", ".3f")]))


if __name__ == "__main__":
    main()
