"""Bytes or JSON in, a validated 28x28 float32 MNIST-style image out (numpy + Pillow only).

Users send photos and scans: dark ink on light paper, any size, off-centre, noisy, JPEG. `to_mnist`
brings them into the form MNIST's own digits were given (LeCun et al.): grey levels, the digit fitted
into a 20x20 box keeping its aspect ratio (anti-aliased), then placed in a 28x28 field so that its
centre of mass sits at the centre, pixel (14, 14) in row/column index coordinates as in MNIST itself.

Every failure is a `PreprocessError` that carries the HTTP status the web layer should answer with:

    400  empty upload, corrupt or truncated image, an image with a zero side
    413  more pixels than allowed (decompression bombs): checked from the header, before decoding
    415  bytes that are not a PNG, JPEG, GIF, BMP, TIFF or WebP image
    422  well-formed input with the wrong content: wrong size for ``mode="none"``, no digit found,
         JSON arrays of the wrong shape, type or range

The `detail` message is meant for the client: it never holds a stack trace or a file path.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_SIZE = 28  # side of an MNIST image
DIGIT_BOX = 20  # MNIST fits each digit into a 20x20 box inside the 28x28 field
SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")  # phones' MPO files open as JPEG

# File signatures of the supported formats: bytes that start like one of them but do not decode are
# corrupt (400); bytes that start like none of them are an unsupported media type (415).
_SIGNATURES: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("PNG", (b"\x89PNG\r\n\x1a\n",)),
    ("JPEG", (b"\xff\xd8\xff",)),
    ("GIF", (b"GIF87a", b"GIF89a")),
    ("BMP", (b"BM",)),
    ("TIFF", (b"II*\x00", b"MM\x00*")),
)

_WORK_SIDE = 512  # photos are reduced to at most this many pixels a side before the analysis
_BACKGROUND_SIDE = 48  # the background tone is estimated on a copy this small ...
_BACKGROUND_WINDOW = 15  # ... with a morphological opening this wide, wider than any pen stroke there
_MIN_CONTRAST = 0.08  # ink must stand out from the paper by this much (of the full grey range) ...
_MIN_SNR = 6.0  # ... and by this many noise standard deviations
_NOISE_FLOOR = 2.0  # grey levels within this many noise standard deviations of the paper are paper
_SPECK_FRACTION = 0.05  # ink blobs lighter than this fraction of the largest one are noise
_BOX_LEVEL = 0.1  # the crop is the bounding box of the ink above this level


class PreprocessError(ValueError):
    """Input the service refuses, with the HTTP status and the message the client should get."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


FloatImage = npt.NDArray[np.float32]


# --------------------------------------------------------------------------------------------- decoding


def _sniff(data: bytes) -> str | None:
    for name, signatures in _SIGNATURES:
        if data.startswith(signatures):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def decode_image(data: bytes, *, max_pixels: int, exact_size: int | None = None) -> Image.Image:
    """Decode an upload into a fully loaded Pillow image (first frame, EXIF orientation applied).

    The pixel count is checked against `max_pixels` from the header, before any pixel is decoded, so a
    small file that claims a huge canvas (a decompression bomb) costs nothing; so is `exact_size`
    (a square side the image must have), so a wrong-sized image is refused without decoding it.
    """
    if not data:
        raise PreprocessError(400, "The upload is empty.")
    kind = _sniff(data)
    supported = "PNG, JPEG, GIF, BMP, TIFF or WebP"
    Image.init()  # registers the TIFF and WebP plugins; returns at once after the first call
    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own bomb check runs inside open(); its warning is an exception only where warnings
        # are errors (our tests). Elsewhere it is logged by Pillow and our own check below applies.
        raise PreprocessError(413, f"The image has more pixels than the limit of {max_pixels}.") from None
    except Exception:  # Pillow raises SyntaxError, OSError, ValueError, struct.error ... on bad headers
        if kind is None:
            raise PreprocessError(415, f"The upload is not a {supported} image.") from None
        raise PreprocessError(400, f"The {kind} image is corrupt or truncated.") from None

    with img:
        fmt = img.format or kind or "image"
        width, height = img.size
        if width <= 0 or height <= 0:
            raise PreprocessError(400, f"The {fmt} image is empty ({width}x{height} pixels).")
        if width * height > max_pixels:
            raise PreprocessError(
                413, f"The image has {width}x{height} pixels, more than the limit of {max_pixels}."
            )
        if exact_size is not None and (width, height) != (exact_size, exact_size):
            raise PreprocessError(
                422,
                f"preprocess=none needs a {exact_size}x{exact_size} image, got {width}x{height}; "
                "use preprocess=mnist for photos and scans.",
            )
        try:
            img.seek(0)  # multi-frame GIF/TIFF/WebP: the first frame
            img.load()  # decode now so that truncation and corruption surface here
            frame = img.copy()  # detaches the frame from the file so that the file can be closed
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise PreprocessError(413, f"The image has more pixels than the limit of {max_pixels}.") from None
        except Exception:  # decoders raise OSError, ValueError, EOFError, SyntaxError, ...
            raise PreprocessError(400, f"The {fmt} image is corrupt or truncated.") from None
    try:
        oriented = ImageOps.exif_transpose(frame)
    except Exception:  # unreadable EXIF: the pixels are fine, keep them as stored
        log.debug("ignoring unreadable EXIF orientation", exc_info=True)
        oriented = frame
    return oriented if oriented is not None else frame


def _grey(img: Image.Image, *, background: float) -> FloatImage:
    """Luminance in [0, 1] as float32: 8-bit levels / 255, 16-bit / 65535; alpha is composited over a
    uniform `background` (1.0: white paper; 0.0: MNIST's black)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a16: FloatImage = np.asarray(img, dtype=np.float32)
        grey16: FloatImage = np.clip(a16 / 65535.0, 0.0, 1.0)
        return grey16
    if img.mode == "F":
        af: FloatImage = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 1.0 if af.max(initial=0.0) <= 1.0 else (255.0 if af.max() <= 255.0 else 65535.0)
        grey_f: FloatImage = np.clip(af / scale, 0.0, 1.0)
        return grey_f
    has_alpha = img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (round(255 * background),) * 3 + (255,))
        img = Image.alpha_composite(paper, rgba)
    if img.mode != "L":
        img = img.convert("RGB").convert("L") if img.mode not in ("1", "P") else img.convert("L")
    return np.asarray(img, dtype=np.float32) / 255.0


# ------------------------------------------------------------------------------------ MNIST procedure


def _resize(a: FloatImage, size: tuple[int, int], resample: Image.Resampling) -> FloatImage:
    """Resize a float image; `size` is (width, height) as in Pillow."""
    out = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32)).resize(size, resample)
    return np.asarray(out, dtype=np.float32)


def _background(ink: FloatImage) -> FloatImage:
    """Smooth estimate of the background under bright ink (uneven lighting included).

    A morphological opening (min then max filter) on a small copy removes every stroke narrower than
    the window; a quadratic surface fitted to what is left models lighting gradients and vignetting,
    and extrapolates to the borders, where the opening itself is unreliable.
    """
    h, w = ink.shape
    scale = _BACKGROUND_SIDE / max(h, w)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    small = _resize(ink, (sw, sh), Image.Resampling.BOX)
    opened = _rank_filter(
        _rank_filter(small, _BACKGROUND_WINDOW, np.minimum), _BACKGROUND_WINDOW, np.maximum
    ).astype(np.float64)  # (sh, sw)
    m = _BACKGROUND_WINDOW // 2
    if sh > 4 * m and sw > 4 * m:  # leave out the margin where the opening loses a slope
        opened = opened[m:-m, m:-m]
        ys, xs = np.mgrid[m : sh - m, m : sw - m]
    else:
        ys, xs = np.mgrid[0:sh, 0:sw]

    def terms(y: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)

    # Coordinates in [-1, 1] across the image, pixel centres, the same at both resolutions.
    coef, *_ = np.linalg.lstsq(
        terms((ys + 0.5) / sh * 2 - 1, (xs + 0.5) / sw * 2 - 1).reshape(-1, 6), opened.ravel(), rcond=None
    )
    fy = (np.arange(h, dtype=np.float64)[:, None] + 0.5) / h * 2 - 1
    fx = (np.arange(w, dtype=np.float64)[None, :] + 0.5) / w * 2 - 1
    fy, fx = np.broadcast_arrays(fy, fx)
    return (terms(fy, fx) @ coef).astype(np.float32)  # (h, w)


def _rank_filter(a: npt.NDArray[Any], size: int, op: Callable[..., Any]) -> npt.NDArray[Any]:
    """PIL's MinFilter/MaxFilter(size) (op = np.minimum/np.maximum), edges replicated as PIL does, equal
    to it bit for bit: a square window's extreme is the extreme of its rows' extremes, so two 1-D
    passes of `size` array operations replace PIL's sort of size² values per pixel (3 ms -> 0.1 ms on
    the 48-pixel background copy)."""
    r, (h, w) = size // 2, a.shape
    padded = np.pad(a, r, mode="edge")
    rows = padded[:, :w]
    for k in range(1, size):
        rows = op(rows, padded[:, k : k + w])  # (h + 2r, w)
    out = rows[:h]
    for k in range(1, size):
        out = op(out, rows[k : k + h])  # (h, w)
    return out


# The four directions that name each pair of 8-connected neighbours once: right, down, and diagonals.
_NEIGHBOURS = ((0, 1), (1, 0), (1, 1), (1, -1))


def _components(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """Label the 8-connected components of `mask` (0 = background, one positive id per component).

    Union-find over the neighbour pairs, in whole-array steps: every root linked to a smaller root
    hooks onto it, then paths are halved until each pixel points at its root. A few rounds suffice
    whatever the shape (a maze-like upload costs about what a blot does), and no Python loop runs per
    pixel (19 ms -> under 1 ms for a 96-pixel mask of a scanned digit).
    """
    h, w = mask.shape
    ids = np.arange(h * w).reshape(h, w)
    pairs = []
    for dy, dx in _NEIGHBOURS:
        x0, x1 = max(0, -dx), w - max(0, dx)
        a, b = mask[: h - dy, x0:x1], mask[dy:, x0 + dx : x1 + dx]
        both = a & b
        pairs.append((ids[: h - dy, x0:x1][both], ids[dy:, x0 + dx : x1 + dx][both]))
    u = np.concatenate([p[0] for p in pairs])
    v = np.concatenate([p[1] for p in pairs])
    parent = ids.ravel().copy()
    while True:
        ru, rv = parent[u], parent[v]
        differ = ru != rv
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ru, rv)[differ], np.minimum(ru, rv)[differ])
        while True:  # path halving until every pixel points at a root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return np.where(mask.ravel(), parent + 1, 0).reshape(h, w)


def _drop_specks(ink: FloatImage) -> FloatImage:
    """Zero the ink blobs that are much lighter than the largest one (dust, noise, stray marks)."""
    h, w = ink.shape
    scale = min(1.0, 96 / max(h, w))  # label on a small copy: fast, and a stroke stays connected
    small_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = _resize(ink, small_size, Image.Resampling.BOX)
    labels = _components(small > _BOX_LEVEL / 2)
    if not labels.any():  # strokes too faint to survive the small copy: nothing to judge them by
        return ink
    ids, inverse = np.unique(labels, return_inverse=True)
    mass = np.bincount(inverse.ravel(), weights=small.ravel())
    mass[ids == 0] = 0.0
    keep_small = (mass >= _SPECK_FRACTION * mass.max())[inverse].reshape(labels.shape) & (labels > 0)
    keep = Image.fromarray(keep_small.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    # Grow the kept region by a couple of pixels so that the soft edges of kept strokes stay.
    grown = _rank_filter(np.asarray(keep, dtype=np.uint8), 5, np.maximum) > 0
    return np.where(grown, ink, 0.0).astype(np.float32)


def _centre_of_mass(a: FloatImage) -> tuple[float, float]:
    total = float(a.sum())
    rows, cols = np.indices(a.shape)
    return float((rows * a).sum() / total), float((cols * a).sum() / total)


def to_mnist(img: Image.Image) -> FloatImage:
    """Bring a photo or scan of one digit into MNIST form: a (28, 28) float32 array in [0, 1], white
    ink on black, the digit fitted into 20x20 and centred by its centre of mass.

    Raises PreprocessError(422) when no digit stands out from the background (a blank page): a
    prediction for an empty field would be meaningless.
    """
    grey = _grey(img, background=1.0)  # (H, W), alpha composited over white paper
    h, w = grey.shape
    if max(h, w) > _WORK_SIDE:  # a 12-megapixel photo needs no more detail than this
        scale = _WORK_SIDE / max(h, w)
        grey = _resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)

    # Polarity: the border is mostly paper, and the ink is the few pixels far from it. Ink darker than
    # the paper (a photo, even a dim one) is inverted so that the ink is bright, as in MNIST.
    border = max(1, round(0.05 * min(grey.shape)))
    frame = np.concatenate(
        [grey[:border].ravel(), grey[-border:].ravel(), grey[:, :border].ravel(), grey[:, -border:].ravel()]
    )
    paper = float(np.median(frame))
    darkest, brightest = (float(v) for v in np.percentile(grey, [0.5, 99.5]))
    dark_ink, bright_ink = paper - darkest, brightest - paper
    light_paper = dark_ink > bright_ink or (dark_ink == bright_ink and paper > 0.5)
    ink = 1.0 - grey if light_paper else grey

    # Remove the background tone (uneven lighting included), then the noise floor; stretch the ink to 1.
    background = _background(ink)
    residual = ink - background
    if light_paper:  # light falls on paper and ink alike: divide by the local paper brightness
        residual = residual / np.maximum(1.0 - background, 0.05)
    level = float(np.median(residual))  # the paper, now flat; noise from the median absolute deviation
    noise = 1.4826 * float(np.median(np.abs(residual - level)))
    floor = level + _NOISE_FLOOR * noise
    strokes = residual[residual > floor]
    top = float(np.percentile(strokes, 95)) if strokes.size else level
    if top - level < max(_MIN_CONTRAST, _MIN_SNR * noise):
        raise PreprocessError(422, "No digit found: nothing in the image stands out from the background.")
    ink = np.clip((residual - floor) / (top - floor), 0.0, 1.0).astype(np.float32)
    ink = _drop_specks(ink)

    # Crop to the ink's bounding box and fit it into 20x20, keeping the aspect ratio.
    rows = np.flatnonzero((ink > _BOX_LEVEL).any(axis=1))
    cols = np.flatnonzero((ink > _BOX_LEVEL).any(axis=0))
    if rows.size == 0:
        raise PreprocessError(422, "No digit found: nothing in the image stands out from the background.")
    digit = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    dh, dw = digit.shape
    scale = DIGIT_BOX / max(dh, dw)
    size = (max(1, min(DIGIT_BOX, round(dw * scale))), max(1, min(DIGIT_BOX, round(dh * scale))))
    digit = np.clip(_resize(digit, size, Image.Resampling.LANCZOS), 0.0, 1.0)  # (<=20, <=20)
    if float(digit.sum()) <= 0.0:
        raise PreprocessError(422, "No digit found: nothing in the image stands out from the background.")

    # Paste into 28x28 so that the centre of mass lands on (14, 14), staying inside the field.
    cy, cx = _centre_of_mass(digit)
    sh, sw = digit.shape
    top_row = min(max(round(IMAGE_SIZE / 2 - cy), 0), IMAGE_SIZE - sh)
    left_col = min(max(round(IMAGE_SIZE / 2 - cx), 0), IMAGE_SIZE - sw)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    out[top_row : top_row + sh, left_col : left_col + sw] = digit
    return out


# ------------------------------------------------------------------------------------------- entry points


def preprocess_bytes(data: bytes, *, mode: Literal["mnist", "none"], max_pixels: int) -> FloatImage:
    """An uploaded image as the model's (28, 28) float32 input in [0, 1].

    mode="mnist": any photo or scan, brought to MNIST form by `to_mnist`.
    mode="none": an image that is already MNIST-like (28x28, white digit on black); its grey levels
    are taken as they are (8-bit / 255, 16-bit / 65535, alpha over black).
    """
    if mode not in ("mnist", "none"):
        raise PreprocessError(422, f"Unknown preprocess mode {_describe(mode)}: use 'mnist' or 'none'.")
    if mode == "mnist":
        return to_mnist(decode_image(data, max_pixels=max_pixels))
    img = decode_image(data, max_pixels=max_pixels, exact_size=IMAGE_SIZE)  # (EXIF keeps a square square)
    grey = _grey(img, background=0.0)
    return np.ascontiguousarray(grey, dtype=np.float32)


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_array(obj: object, *, size: int = IMAGE_SIZE) -> FloatImage:
    """A JSON image (`size` rows of `size` finite numbers in [0, 1]) as a float32 (size, size) array.

    Booleans, strings, None, NaN, infinities and out-of-range values are refused with a 422 whose
    detail says what was wrong and where (row and column, counted from 0).
    """
    shape = f"{size}x{size} array (a list of {size} rows of {size} numbers in [0, 1])"
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if not isinstance(obj, (list, tuple)):
        raise PreprocessError(422, f"Expected a {shape}, got {type(obj).__name__}.")
    if len(obj) != size:
        raise PreprocessError(422, f"Expected a {shape}, got {len(obj)} rows.")
    out = np.empty((size, size), dtype=np.float32)
    for i, row in enumerate(obj):
        if not isinstance(row, (list, tuple)):
            raise PreprocessError(422, f"Row {i} must be a list of {size} numbers, got {type(row).__name__}.")
        if len(row) != size:
            raise PreprocessError(422, f"Row {i} has {len(row)} values, expected {size}.")
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise PreprocessError(
                    422,
                    f"Pixel [{i}][{j}] must be a number in [0, 1], got {type(v).__name__} {_describe(v)}.",
                )
            if not (0 <= v <= 1):  # False for NaN too; compares huge ints exactly, without overflow
                what = (
                    "not a finite number" if isinstance(v, float) and not math.isfinite(v) else "out of range"
                )
                raise PreprocessError(422, f"Pixel [{i}][{j}] is {what}: {_describe(v)}; expected [0, 1].")
            out[i, j] = v
    return out
