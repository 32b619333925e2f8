"""Image preprocessing against a direct PIL/numpy computation."""

import io

import numpy as np
import pytest
from PIL import Image

from moe_lvlm.data import image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _photo(w, h, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _normalise(img: Image.Image) -> np.ndarray:
    return (np.asarray(img, np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)


@pytest.mark.parametrize("w, h", [(50, 30), (30, 50), (16, 16), (12, 9)])
def test_resize_matches_clip(w, h):
    size = 16
    img = _photo(w, h)
    # CLIP: shortest side -> size (bicubic), long side int(size * long / short), centre crop.
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    resized = img if new == (w, h) else img.resize(new, Image.Resampling.BICUBIC)
    arr = np.asarray(resized)
    top, left = round((new[1] - size) / 2), round((new[0] - size) / 2)
    expected = _normalise(Image.fromarray(arr[top:top + size, left:left + size]))
    got = image.preprocess(img, size, MEAN, STD, aspect="resize")
    assert got.shape == (size, size, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("w, h", [(50, 30), (30, 51)])
def test_pad_matches_llava(w, h):
    size = 16
    img = _photo(w, h, seed=1)
    side = max(w, h)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = [int(m * 255) for m in MEAN]
    y, x = (side - h) // 2, (side - w) // 2
    canvas[y:y + h, x:x + w] = np.asarray(img)
    expected = _normalise(Image.fromarray(canvas).resize((size, size), Image.Resampling.BICUBIC))
    got = image.preprocess(img, size, MEAN, STD, aspect="pad")
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_solid_colour_and_padding_values():
    # A solid image normalises to (c / 255 - mean) / std everywhere; the pad of a wide image is
    # the mean colour, which normalises to about 0.
    img = Image.new("RGB", (64, 16), (200, 100, 50))
    got = image.preprocess(img, 32, MEAN, STD, aspect="pad")
    expected = (np.array([200, 100, 50]) / 255.0 - MEAN) / STD
    np.testing.assert_allclose(got[16, 16], expected, atol=1e-5)
    np.testing.assert_allclose(got[0, 0], 0.0, atol=0.02)
    np.testing.assert_allclose(image.preprocess(img, 32, MEAN, STD, "resize"),
                               np.broadcast_to(expected, (32, 32, 3)), atol=1e-5)


def test_decode_jpeg_png_array_and_bad_bytes():
    img = _photo(20, 10)
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        out = image.decode(buf.getvalue())
        assert out.mode == "RGB" and out.size == (20, 10)
    gray = Image.fromarray(np.full((5, 6), 7, np.uint8))
    buf = io.BytesIO()
    gray.save(buf, "PNG")
    assert np.asarray(image.decode(buf.getvalue()))[0, 0].tolist() == [7, 7, 7]
    assert image.decode(np.asarray(img)).size == (20, 10)
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        image.decode(b"not an image")
    with pytest.raises(ValueError, match="unknown aspect"):
        image.preprocess(img, 8, MEAN, STD, aspect="stretch")
