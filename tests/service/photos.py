"""Render MNIST digits as the photos users send: dark ink on uneven grey paper, upscaled, off-centre,
noisy, JPEG-compressed; and product photos as a shop takes them (a dark garment on a light background).
Shared by the preprocessing tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def render_photo(
    digit: np.ndarray,
    rng: np.random.Generator,
    *,
    canvas: tuple[int, int] = (300, 224),
    scale: float = 7.0,
    noise: float = 0.03,
    quality: int | None = 75,
    tint: tuple[float, float, float] | None = None,
) -> bytes:
    """`digit` (28, 28) uint8 white-on-black -> encoded photo bytes (JPEG, or PNG when quality is None).

    canvas is (height, width). The 28x28 field is upscaled by `scale` (bicubic, like a pen stroke seen
    by a camera) and placed at a random offset; the paper is grey with a linear lighting gradient, or
    an RGB colour when `tint` (a factor per channel) is given, as phone cameras save it.
    """
    height, width = canvas
    side = round(28 * scale)
    ink = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
    ink_a = np.zeros((height, width), dtype=np.float64)
    top = int(rng.integers(0, max(1, height - side + 1)))
    left = int(rng.integers(0, max(1, width - side + 1)))
    patch = np.asarray(ink, dtype=np.float64)[: height - top, : width - left] / 255.0
    ink_a[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    yy, xx = np.mgrid[0:height, 0:width]
    tone = rng.uniform(0.62, 0.85)
    gy, gx = rng.uniform(-0.12, 0.12, size=2)
    paper = tone + gy * (yy / height - 0.5) + gx * (xx / width - 0.5)
    ink_tone = rng.uniform(0.08, 0.25)
    photo = paper * (1 - ink_a) + ink_tone * ink_a + rng.normal(0.0, noise, size=ink_a.shape)
    if tint is not None:
        photo = photo[..., None] * np.asarray(tint)  # (height, width, 3)
    img = Image.fromarray(np.clip(photo * 255 + 0.5, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    if quality is None:
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def render_product(
    rng: np.random.Generator,
    *,
    canvas: tuple[int, int] = (420, 330),
    box: tuple[int, int, int, int] = (60, 90, 380, 250),
    background: int = 236,
    garment: int = 60,
    noise: float = 1.5,
    fmt: str = "PNG",
) -> bytes:
    """A product photo: a pair of trousers (waistband, two legs, the gap between them), grey level
    `garment`, filling `box` (top, left, bottom, right; non-square, off-centre) on a `background` of
    `canvas` (height, width), with camera noise of `noise` grey levels (well within the 5 % trim)."""
    height, width = canvas
    top, left, bottom, right = box
    photo = np.full((height, width), float(background))
    photo[top:bottom, left:right] = garment
    gap = slice(left + (right - left) * 2 // 5, right - (right - left) * 2 // 5)
    photo[top + (bottom - top) // 4 : bottom, gap] = background  # between the legs
    photo[top : top + (bottom - top) // 10, left:right] = garment / 2  # the darker waistband
    photo += rng.normal(0.0, noise, size=photo.shape)
    img = Image.fromarray(np.clip(photo + 0.5, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()
