"""Input pipeline throughput: examples/s of 336x336 CLIP preprocessing from JPEG files.

Writes N synthetic 640x480 JPEGs (smooth gradients and shapes, quality 90) and a LLaVA JSON file,
then times the whole pipeline (read + JPEG decode + resize shortest side + centre crop + normalise
+ chat template + batching) with 0, 1 and 2 worker processes, excluding the first batch (worker
start-up). A single-thread loop of decode + preprocess alone is the reference.

  python benchmarks/data_pipeline.py [--images 512] [--batch 16] [--threads 1,2]
"""

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from configs import base
from moe_lvlm.data import image, pipeline
from moe_lvlm.data.tokenizer import train_tokenizer


def write_jpegs(root: pathlib.Path, n: int) -> str:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    records = []
    for i in range(n):
        c = rng.uniform(0, 1, (3, 3))
        rgb = np.stack([c[k, 0] * xx / 640 + c[k, 1] * yy / 480 + c[k, 2] for k in range(3)], -1)
        img = Image.fromarray((np.clip(rgb / rgb.max(), 0, 1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(5):
            x, y = rng.integers(0, 600), rng.integers(0, 440)
            draw.ellipse((x, y, x + rng.integers(20, 200), y + rng.integers(20, 200)),
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        img.save(root / f"{i}.jpg", quality=90)
        records.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "Some coloured shapes on a gradient."}]})
    (root / "data.json").write_text(json.dumps(records))
    return f"llava:{root / 'data.json'}?image_root={root}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", default="1,2", help="read threads per process to try")
    args = parser.parse_args()

    root = pathlib.Path(tempfile.mkdtemp())
    spec = write_jpegs(root, args.images)
    tok = train_tokenizer(["What is in the picture? Some coloured shapes on a gradient."] * 50,
                          vocab_size=300)
    cfg = base.get_base_config()
    cfg.model.vision.update(image_size=336, patch_size=14)  # 576 image tokens, as CLIP ViT-L/14
    cfg.data.update(aspect="resize", seq_len=704, system_prompt="")
    mean, std = cfg.model.vision.mean, cfg.model.vision.std

    start = time.perf_counter()
    for i in range(min(args.images, 128)):
        with open(root / f"{i}.jpg", "rb") as f:
            image.preprocess(image.decode(f.read()), 336, mean, std, "resize")
    rate = min(args.images, 128) / (time.perf_counter() - start)
    print(f"decode+preprocess only, 1 thread: {rate:.1f} examples/s")

    steps = args.images // args.batch - 1
    for threads in (int(t) for t in args.threads.split(",")):
        for workers in (0, 1, 2):
            cfg.data.update(num_workers=workers, read_threads=threads, prefetch=2)
            it = pipeline.make_iterator(cfg.data, cfg.model, tok, global_batch_size=args.batch,
                                        mixture=spec, num_epochs=1)
            next(it)
            start = time.perf_counter()
            for _ in range(steps):
                next(it)
            rate = steps * args.batch / (time.perf_counter() - start)
            counts = {k: v for k, v in pipeline.skip_counts(it).items() if v}
            assert not counts, counts
            it.close()
            print(f"workers={workers} read_threads={threads}: {rate:.1f} examples/s")


if __name__ == "__main__":
    main()
