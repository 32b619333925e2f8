"""Decoding throughput with the KV cache (`moe_lvlm.generate.generate`, greedy, no early stop).

For each batch size: one image + `--text` prompt tokens per row, then `--new` tokens. Times the
whole call at two lengths (`--new` and `--short`) after a warm-up of each; decode tokens/s is
batch x (new - short) / (t_new - t_short), so the prefill (ViT + prompt) cancels out, and the
end-to-end figure is batch x new / t_new.

Models: the random full-size model (`--preset`, bf16 weights, as for serving; default) and, with
`--workdir`, the newest checkpoint of a `python -m moe_lvlm.train` workdir (e.g. the demo).

  PYTHONPATH=. python benchmarks/generation.py --batches 1,32            # random full size
  PYTHONPATH=. python benchmarks/generation.py --workdir runs/demo --batches 1,32
"""

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402


def random_model(args):
    """(model, params, model config): the preset with random bf16 weights."""
    import jax
    import jax.numpy as jnp

    from moe_lvlm.models.lvlm import build_model

    cfg = common.model_config(args.preset, args.layers)
    cfg.param_dtype = "bfloat16"
    cfg.attention = "xla"
    model = build_model(cfg)
    params = common.init_params(model, cfg, jax.random.PRNGKey(0))
    return model, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), cfg


def workdir_model(args):
    from moe_lvlm.workdir import load_trained

    trained = load_trained(args.workdir)
    return trained.model, trained.params, trained.model_config


def prompts(cfg, batch: int, text: int, seed: int = 0) -> dict:
    import numpy as np

    from moe_lvlm.config import num_image_tokens

    rng = np.random.default_rng(seed)
    n_img = num_image_tokens(cfg)
    ids = rng.integers(3, cfg.decoder.vocab_size - 1, (batch, n_img + text)).astype(np.int32)
    ids[:, :n_img] = cfg.image_token_id
    size = cfg.vision.image_size
    return {
        "input_ids": ids,
        "positions": np.broadcast_to(np.arange(n_img + text, dtype=np.int32), ids.shape).copy(),
        "segment_ids": np.ones_like(ids),
        "images": rng.standard_normal((batch, 1, size, size, 3)).astype(np.float32),
    }


def measure(model, params, cfg, batch: int, args) -> dict:
    import jax

    from moe_lvlm.generate import generate

    inputs = jax.device_put(prompts(cfg, batch, args.text))
    rng = jax.random.PRNGKey(0)

    def call(n):
        return generate(model, params, inputs["input_ids"], inputs["positions"],
                        inputs["segment_ids"], inputs["images"], rng, max_new_tokens=n,
                        stop_ids=())

    timings = {}
    for n in (args.short, args.new):
        call(n).block_until_ready()
        times = common.median_seconds(lambda n=n: call(n), args.repeats, jax.block_until_ready)
        timings[n] = common.summarize(times)["median_s"]
    decode_s = timings[args.new] - timings[args.short]
    return {
        "batch": batch, "prompt": inputs["input_ids"].shape[1], "new": args.new,
        "total_s": timings[args.new], "short_s": timings[args.short],
        "decode_tokens_s": batch * (args.new - args.short) / decode_s if decode_s > 0 else None,
        "e2e_tokens_s": batch * args.new / timings[args.new],
        "ms_per_step": 1e3 * decode_s / (args.new - args.short) if decode_s > 0 else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="", help="a trained workdir instead of --preset")
    parser.add_argument("--preset", default="moe_llava_1p6bx4")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0 = preset)")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--text", type=int, default=32, help="text tokens after the image")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--short", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json_out", default="", help="also write the rows here")
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")  # before jax starts
    if not 0 < args.short < args.new:
        raise SystemExit(f"need 0 < --short ({args.short}) < --new ({args.new})")

    import jax

    model, params, cfg = workdir_model(args) if args.workdir else random_model(args)
    source = args.workdir or f"random {args.preset} (bf16 weights)"
    rows = [measure(model, params, cfg, int(b), args) for b in args.batches.split(",")]
    print(f"{source} on {jax.devices()[0].device_kind}, jax {jax.__version__}; greedy, "
          f"{args.text} text tokens after the image, median of {args.repeats}")
    print(common.table(rows, [
        ("batch", "batch", "d"), ("prompt tokens", "prompt", "d"), ("new tokens", "new", "d"),
        ("call s", "total_s", ".3f"), (f"call s ({args.short} new)", "short_s", ".3f"),
        ("decode ms/step", "ms_per_step", ".2f"), ("decode tokens/s", "decode_tokens_s", ",.0f"),
        ("end-to-end tokens/s", "e2e_tokens_s", ",.0f")]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
