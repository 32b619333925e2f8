"""Image decoding and the vision encoders' preprocessing.

  'resize' (CLIP): resize the shortest side to `size` (bicubic), centre-crop `size` x `size`.
  'pad' (LLaVA's image_aspect_ratio='pad'): pad to a square with the mean colour (image centred),
      then the CLIP steps above (a plain bicubic resize for a square).
Then scale to [0, 1] and normalise with the encoder's mean/std: out = (x / 255 - mean) / std.
"""

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

ASPECT_MODES = ("resize", "pad")


def decode(data: bytes | np.ndarray) -> Image.Image:
    """Encoded image bytes (any format PIL reads) or a uint8 [H, W, C] array -> RGB PIL image."""
    if isinstance(data, np.ndarray):
        return Image.fromarray(data.astype(np.uint8)).convert("RGB")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def resize_and_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = (size, int(h * scale)) if w <= h else (int(w * scale), size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess(
    img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float], aspect: str = "pad"
) -> np.ndarray:
    """RGB PIL image -> normalised float32 [size, size, 3]."""
    if aspect not in ASPECT_MODES:
        raise ValueError(f"unknown aspect mode {aspect!r}; use one of {ASPECT_MODES}")
    if aspect == "pad":
        img = pad_to_square(img, tuple(int(m * 255) for m in mean))
    img = resize_and_center_crop(img, size)
    x = np.asarray(img, np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
