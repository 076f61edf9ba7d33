"""Make the sample images under examples/: MNIST test digits rendered as scans and phone photos.

Each file shows a digit from the MNIST test set (t10k-images-idx3-ubyte), so its label is known:
`examples/<digit>.png` and, for a few digits, `examples/<digit>.jpg`. The digit picked for each class
is the most typical of the first 50 test images of that class (the highest correlation with the mean
image of the class), so the samples are clear handwriting rather than MNIST's oddities. The digit is
upscaled about 7-10x, slightly rotated, placed off-centre as dark ink on grey paper with uneven
lighting and a little sensor noise: the kind of picture users send, not a 28x28 MNIST array. The
JPEGs are colour photos (blue-black ink on cream paper). Everything is seeded, so running

    python examples/make_examples.py

again rewrites the same files. Needs numpy, Pillow and the MNIST test set (`capsnet data mnist`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from capsnet.model_export.data import load_split

HERE = Path(__file__).resolve().parent
JPEG_DIGITS = (1, 3, 7)
MAX_BYTES = 60_000


def typical_of_each_class(images: np.ndarray, labels: np.ndarray, first: int = 50) -> dict[int, int]:
    """Test-set index of the most typical of the first `first` images of each class 0-9."""
    picks = {}
    flat = images.reshape(len(images), -1).astype(np.float64)
    for d in range(10):
        members = np.flatnonzero(labels == d)
        mean = flat[members].mean(axis=0)
        candidates = members[:first]
        scores = [np.corrcoef(flat[i], mean)[0, 1] for i in candidates]
        picks[d] = int(candidates[int(np.argmax(scores))])
    return picks


def render(digit: np.ndarray, rng: np.random.Generator, *, colour: bool) -> Image.Image:
    """A (28, 28) white-on-black uint8 digit as a scan or photo of dark ink on light paper."""
    height, width = int(rng.integers(220, 300)), int(rng.integers(220, 320))
    side = int(rng.integers(190, 240))  # the 28x28 field upscaled ~7-9x: the digit itself is ~140-170 px
    ink = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
    ink = ink.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BICUBIC)
    patch = np.asarray(ink, dtype=np.float64) / 255
    rows, cols = np.flatnonzero(patch.max(axis=1) > 0.02), np.flatnonzero(patch.max(axis=0) > 0.02)
    patch = patch[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # the ink itself
    ph, pw = patch.shape
    height, width = max(height, ph + 24), max(width, pw + 24)
    top = int(rng.integers(12, height - ph - 11))  # anywhere, off-centre, at least 12 px from the edges
    left = int(rng.integers(12, width - pw - 11))
    ink_a = np.zeros((height, width))
    ink_a[top : top + ph, left : left + pw] = patch

    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    light = 1.0 + rng.uniform(-0.12, 0.12) * (yy - 0.5) + rng.uniform(-0.12, 0.12) * (xx - 0.5)
    light -= 0.15 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2)  # a little vignetting
    noise = rng.normal(0.0, 1.5 / 255, size=(height, width))
    if colour:
        paper_rgb = np.array([0.93, 0.89, 0.80]) * rng.uniform(0.85, 1.0)  # cream paper
        ink_rgb = np.array([0.10, 0.12, 0.30])  # blue-black ballpoint
        a = ink_a[..., None]
        rgb = (paper_rgb * (1 - a) + ink_rgb * a) * light[..., None] + noise[..., None]
        return Image.fromarray(np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8))
    paper, ink_tone = rng.uniform(0.78, 0.92), rng.uniform(0.10, 0.22)
    grey = (paper * (1 - ink_a) + ink_tone * ink_a) * light + noise
    return Image.fromarray(np.clip(grey * 255 + 0.5, 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE)
    args = parser.parse_args()
    images, labels = load_split("mnist", "test")
    for digit, index in typical_of_each_class(images, labels).items():
        rng = np.random.default_rng(1000 + digit)
        files = {args.output / f"{digit}.png": (render(images[index], rng, colour=False), {"optimize": True})}
        if digit in JPEG_DIGITS:
            photo = render(images[index], rng, colour=True)
            files[args.output / f"{digit}.jpg"] = (photo, {"quality": 80, "optimize": True})
        for path, (img, params) in files.items():
            img.save(path, **params)
            size = path.stat().st_size
            if size > MAX_BYTES:
                raise SystemExit(f"{path.name} is {size} bytes, over {MAX_BYTES}")
            print(f"{path.name}: MNIST test image {index}, {img.size[0]}x{img.size[1]}, {size} bytes")


if __name__ == "__main__":
    main()
