"""Bytes or JSON in, a validated 28x28 float32 MNIST-style image out.

Users send photos and scans: dark ink on light paper, any size, off-centre, noisy, JPEG. `to_mnist`
brings them into the form MNIST's own digits were given (LeCun et al.): grey levels, the digit fitted
into a 20x20 box keeping its aspect ratio (anti-aliased), then placed in a 28x28 field so that its
centre of mass sits at the centre, pixel (14, 14) in row/column index coordinates as in MNIST itself.

Which library does which step:

- Pillow: format sniffing and opening, the header-only pixel-count check against decompression bombs,
  reduced-scale decoding of large JPEGs (libjpeg's DCT scaling, `Image.draft`, before any pixel is
  decoded), the first frame, EXIF orientation, and grey levels from every mode (16-bit, palette,
  alpha, CMYK).
- OpenCV (opencv-python-headless): the decoding of the one common form of `preprocess=none`, a 28x28
  8-bit grey PNG without chunks that change what a pixel means (after its structure, CRCs and
  row filters are checked here; anything else goes to Pillow), area resizing (to the working size,
  to the small copies the background and the specks are judged on, and into the 20x20 box), the
  morphological opening under the background estimate, connected components for the specks, the
  dilation that keeps their soft edges, the histograms the quantiles are read from, the ink's
  bounding box and its moments.
- numpy: what only this module knows: the polarity, contrast and noise rules, the quadratic lighting
  surface, the speck rule and MNIST's centring convention.

Every failure is a `PreprocessError` that carries the HTTP status the web layer should answer with:

    400  empty upload, corrupt or truncated image, an image with a zero side
    413  more pixels than allowed (decompression bombs): checked from the header, before decoding
    415  bytes that are not a PNG, JPEG, GIF, BMP, TIFF or WebP image
    422  well-formed input with the wrong content: wrong size for ``mode="none"``, no digit found,
         JSON arrays of the wrong shape, type or range

The `detail` message is meant for the client: it never holds a stack trace or a file path.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import struct
import zlib
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

# OpenCV's own thread pool stays unused: an image's steps take tens of microseconds, too short to
# share, and the service's cores are kept busy by its requests and onnxruntime. With OpenCV's default
# (a thread per core) its idle workers spin on the other cores, costing CPU time for no wall time.
cv2.setNumThreads(1)

IMAGE_SIZE = 28  # side of an MNIST image
DIGIT_BOX = 20  # MNIST fits each digit into a 20x20 box inside the 28x28 field
SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")  # phones' MPO files open as JPEG

# File signatures of the supported formats: bytes that start like one of them but do not decode are
# corrupt (400); bytes that start like none of them are an unsupported media type (415).
_SIGNATURES: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("PNG", (b"\x89PNG\r\n\x1a\n",)),  # _PNG_SIGNATURE
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
_SORT_SMALL = 4096  # order statistics of this many values or fewer come from a full sort
_BOX_LEVEL = 0.1  # the crop is the bounding box of the ink above this level
_BACKGROUND_KERNEL = np.ones((_BACKGROUND_WINDOW, _BACKGROUND_WINDOW), dtype=np.uint8)
_GROW_KERNEL = np.ones((5, 5), dtype=np.uint8)  # kept strokes keep this much of their soft edges


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


def decode_image(
    data: bytes, *, max_pixels: int, exact_size: int | None = None, work_side: int | None = None
) -> Image.Image:
    """Decode an upload into a fully loaded Pillow image (first frame, EXIF orientation applied).

    The pixel count is checked against `max_pixels` from the header, before any pixel is decoded, so a
    small file that claims a huge canvas (a decompression bomb) costs nothing; so is `exact_size`
    (a square side the image must have), so a wrong-sized image is refused without decoding it.

    `work_side`: the side the caller will reduce the image to. A JPEG is decoded at 1/2, 1/4 or 1/8
    scale where that keeps its long side at 3/4 of `work_side` or more (libjpeg scales the DCT: the
    full-size pixels never exist), and as grey levels if it is colour. Other formats, and JPEGs too
    small for that, decode at full size.
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
            if work_side is not None and (s := _draft_scale(max(width, height), work_side)) > 1:
                # JPEG only (other formats ignore it); colour comes out as grey, the luma JPEG stores.
                img.draft("L" if img.mode == "RGB" else None, (max(1, width // s), max(1, height // s)))
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


# JPEG start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC): the frame's height and width follow.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_SCAN_LIMIT = 65536  # EXIF and ICC segments come first; a frame header further in is not looked for


def header_pixels(data: bytes) -> int | None:
    """The pixel count a PNG, JPEG, GIF or BMP header announces, read from its first bytes without
    decoding anything; None for other formats, or where the header is not where it should be.

    Only a hint of the work ahead (the web layer decodes small images where it stands and hands big
    ones to a thread): what decodes is checked by `decode_image` either way, and a file whose header
    lies decodes no more pixels than its header says."""
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack_from(">II", data, 16)
        return int(width * height)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack_from("<HH", data, 6)
        return int(width * height)
    if data.startswith(b"BM") and len(data) >= 26:
        (header_size,) = struct.unpack_from("<I", data, 14)
        width, height = struct.unpack_from("<HH" if header_size == 12 else "<ii", data, 18)
        return abs(int(width * height))
    if data.startswith(b"\xff\xd8"):
        pos, end = 2, min(len(data), _JPEG_SCAN_LIMIT)
        while pos + 9 <= end and data[pos] == 0xFF:
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte before a marker
                pos += 1
                continue
            if marker in _JPEG_FRAMES:
                height, width = struct.unpack_from(">HH", data, pos + 5)
                return int(width * height)
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
                pos += 2
                continue
            (length,) = struct.unpack_from(">H", data, pos + 2)
            pos += 2 + length
    return None


def _draft_scale(side: int, work_side: int) -> int:
    """The largest of libjpeg's DCT scalings (1/8, 1/4, 1/2) that leaves `side` at 3/4 of
    `work_side` or more; 1 when none does. A 4000-pixel photo comes out at 500 pixels, near enough to
    a 512-pixel working side to be analysed as it is, where 1/4 would leave 1000 pixels to average."""
    return next((s for s in (8, 4, 2) if side // s >= 3 * work_side // 4), 1)


def _grey(img: Image.Image, *, background: float, max_side: int | None = None) -> FloatImage:
    """Luminance in [0, 1] as float32: 8-bit levels / 255, 16-bit / 65535; alpha is composited over a
    uniform `background` (1.0: white paper; 0.0: MNIST's black). See `_levels`."""
    return _to_float(*_levels(img, background=background, max_side=max_side))


def _levels(
    img: Image.Image, *, background: float, max_side: int | None = None
) -> tuple[npt.NDArray[Any], float]:
    """The grey levels as stored, and the level of full white: uint8 and 255, uint16 and 65535, or
    float32 in [0, 1] and 1.0 (32-bit integer and float modes); alpha is composited over a uniform
    `background` (1.0: white paper; 0.0: MNIST's black).

    An image with a side over `max_side` is first reduced to it by area averaging (OpenCV), on its
    integer levels where it has them: a uniform paper then stays uniform to the bit, as the paper and
    noise rules of `to_mnist` expect, where float sums would leave it jittering in the last place.
    """
    levels: npt.NDArray[Any]
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        levels, full = np.asarray(img).astype(np.uint16), 65535.0  # (native byte order)
    elif img.mode == "I":
        levels, full = np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0), 1.0
    elif img.mode == "F":
        af = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 1.0 if af.max(initial=0.0) <= 1.0 else (255.0 if af.max() <= 255.0 else 65535.0)
        levels, full = np.clip(af / scale, 0.0, 1.0), 1.0
    else:
        has_alpha = img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info
        if has_alpha:
            rgba = img.convert("RGBA")
            paper = Image.new("RGBA", rgba.size, (round(255 * background),) * 3 + (255,))
            img = Image.alpha_composite(paper, rgba)
        if img.mode != "L":
            img = img.convert("RGB").convert("L") if img.mode not in ("1", "P") else img.convert("L")
        levels, full = np.asarray(img), 255.0
    return (levels if max_side is None else _within(levels, max_side)), full


def _within(levels: npt.NDArray[Any], max_side: int) -> npt.NDArray[Any]:
    """`levels` reduced by area averaging to `max_side` pixels on its longer side, if it is longer."""
    return _area(levels, max_side / max(levels.shape)) if max(levels.shape) > max_side else levels


def _to_float(levels: npt.NDArray[Any], full: float) -> FloatImage:
    grey: FloatImage = levels.astype(np.float32)  # a new array, which the caller may change
    return np.divide(grey, np.float32(full), out=grey)


# ------------------------------------------------------------------------------------ MNIST procedure


def _area(a: npt.NDArray[Any], scale: float) -> npt.NDArray[Any]:
    """`a` resized by `scale` (each side at least one pixel), by area averaging: the mean of the
    source under each target pixel, so nothing thinner than a target pixel is lost or aliased.

    A reduction by 2 or more first halves the image: OpenCV averages 2x2 blocks in a vectorised pass,
    where the general area resize costs about as much per source pixel as everything after it
    (almost twice the two steps' time). Where a side is odd its edge row or column is
    repeated, so the grid spans one pixel more: a target pixel's edges move by at most one source
    pixel (at the far edge), 0.4 % of a 227-pixel side, and the example scans come out within an
    8-bit grey level of the one-step reduction."""
    h, w = a.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if h >= 2 * size[1] and w >= 2 * size[0]:
        if h % 2 or w % 2:
            a = cv2.copyMakeBorder(a, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
        a = cv2.resize(a, ((w + w % 2) // 2, (h + h % 2) // 2), interpolation=cv2.INTER_AREA)
    return np.asarray(cv2.resize(a, size, interpolation=cv2.INTER_AREA))


def _quantiles(a: FloatImage, qs: tuple[float, ...]) -> list[float]:
    """Order statistics of `a`'s values: for each fraction q in `qs`, the value of rank
    round(q * (n - 1)) in sorted order (np.quantile's "nearest" method: a value that occurs, so that
    a tie between the paper and the ink stays an exact tie and a flat paper has a deviation of 0)."""
    values = a.reshape(-1)
    return _order_statistics(values, [round(q * (values.size - 1)) for q in qs])


def _statistics_sample(a: FloatImage) -> FloatImage:
    """The pixels the paper level and the noise are measured on: every other row and column of an
    image of more than 16,384 pixels, all of a smaller one.

    Picked, not averaged, so the noise keeps its distribution; the median of a quarter of 50,000
    pixels lies within about 1 % of the noise's standard deviation of the median of all of them
    (its standard error, 1.25 sigma / sqrt(n)), far inside the margins of the noise floor (2 sigma)
    and the contrast rule (6 sigma), for a quarter of the selection's cost. A flat paper still has a
    deviation of exactly 0."""
    return a[::2, ::2] if a.size > 4 * _SORT_SMALL else a


def _order_statistics(values: FloatImage, ranks: list[int], depth: int = 0) -> list[float]:
    """The values of these ranks (from 0) in sorted order, found without sorting them all: each
    value's bin among 256 over their range (OpenCV, one byte a value) and a histogram of those say
    which bin holds a rank, and only that bin's values are searched further, the same way: a paper
    of nearly one grey level falls into one bin at first, and is spread over 256 at the next step.
    (np.sort finishes small sets: np.partition takes ten times as long on many equal values.)"""
    if values.size <= _SORT_SMALL or depth == 4:
        ordered = np.sort(values)
        return [float(ordered[k]) for k in ranks]
    if depth == 0:
        found = [_bracketed(values, k) for k in ranks]
        if all(v is not None for v in found):
            return [v for v in found if v is not None]
    lo, hi, _, _ = cv2.minMaxLoc(values)
    if not hi > lo:
        return [float(lo)] * len(ranks)
    scale = 255.0 / (hi - lo)
    bins = cv2.convertScaleAbs(values, alpha=scale, beta=-lo * scale).reshape(-1)  # (n,) each one's bin
    counts = cv2.calcHist([bins], [0], None, [256], [0, 256]).reshape(-1)  # (256,)
    below = np.cumsum(counts, dtype=np.float64)  # values in and before each bin
    picked = []
    for rank in ranks:
        b = int(np.searchsorted(below, rank, side="right"))  # the bin that holds the rank
        k = rank - int(below[b] - counts[b])
        picked += _order_statistics(values[bins == b], [k], depth + 1)
    return picked


def _bracketed(values: FloatImage, rank: int) -> float | None:
    """The value of this rank in sorted order, from the few values between two bounds that every
    eighth value places around it: exactly `below` values lie under the lower bound and the rank is
    among the `inside` ones, or the bounds missed it (None: the histograms find it instead)."""
    n = values.size
    sample = values[::8]  # (m,) a strided view: np.partition copies it
    m = sample.size
    q = rank / (n - 1)
    centre, margin = q * (m - 1), 4.0 * math.sqrt(m * q * (1.0 - q)) + 4.0  # 4 binomial deviations
    r1, r2 = max(0, math.floor(centre - margin)), min(m - 1, math.ceil(centre + margin))
    ends = np.partition(sample, (r1, r2))
    lo, hi = ends[r1], ends[r2]
    below = int(np.count_nonzero(values < lo))
    inside = values[(values >= lo) & (values <= hi)]  # (k,) in the order they come, a few per cent
    if not (below <= rank < below + inside.size) or inside.size > n // 4:
        return None
    return float(np.partition(inside, rank - below)[rank - below])


@functools.lru_cache(maxsize=64)
def _surface_fit(sh: int, sw: int) -> tuple[int, npt.NDArray[np.float64]]:
    """For a (sh, sw) opened background copy: the margin left out of the fit, and the pseudo-inverse
    (6, N) that turns its N remaining pixels into the quadratic surface's coefficients (least squares)."""
    m = _BACKGROUND_WINDOW // 2
    if not (sh > 4 * m and sw > 4 * m):  # too small to spare a margin
        m = 0
    ys, xs = np.mgrid[m : sh - m, m : sw - m]
    # Coordinates in [-1, 1] across the image, pixel centres, the same at both resolutions.
    terms = _terms((ys + 0.5) / sh * 2 - 1, (xs + 0.5) / sw * 2 - 1).reshape(-1, 6)
    fit = np.asarray(np.linalg.pinv(terms), dtype=np.float64)  # (6, N)
    fit.setflags(write=False)  # shared by every call with this shape
    return m, fit


def _terms(y: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)


def _background(ink: FloatImage) -> FloatImage:
    """Smooth estimate of the background under bright ink (uneven lighting included).

    A morphological opening (erosion then dilation, OpenCV) on a small copy removes every stroke
    narrower than the window; a quadratic surface fitted to what is left models lighting gradients
    and vignetting, and extrapolates to the borders, where the opening itself is unreliable.
    """
    h, w = ink.shape
    small = _area(ink, _BACKGROUND_SIDE / max(h, w))  # (sh, sw)
    sh, sw = small.shape
    # OpenCV's default border for erosion and dilation leaves out what lies outside the image: the
    # same extremes as replicating the edge, as PIL's Min/MaxFilter do.
    opened = cv2.morphologyEx(small, cv2.MORPH_OPEN, _BACKGROUND_KERNEL)  # (sh, sw)
    m, fit = _surface_fit(sh, sw)
    c0, c1, c2, c3, c4, c5 = fit @ np.asarray(opened[m : sh - m, m : sw - m], dtype=np.float64).ravel()
    # The surface on the full grid, term by term: rows (1, y, y²), columns (x, x²) and the product xy.
    fy = (np.arange(h, dtype=np.float64) + 0.5) / h * 2 - 1  # (h,)
    fx = (np.arange(w, dtype=np.float64) + 0.5) / w * 2 - 1  # (w,)
    surface = np.outer((c4 * fy).astype(np.float32), fx.astype(np.float32))  # (h, w)
    surface += (c0 + c2 * fy + c5 * fy * fy).astype(np.float32)[:, None]
    surface += (c1 * fx + c3 * fx * fx).astype(np.float32)[None, :]
    return surface


def _drop_specks(ink: FloatImage) -> FloatImage:
    """Zero the ink blobs that are much lighter than the largest one (dust, noise, stray marks), in
    place."""
    h, w = ink.shape
    small = _area(ink, 96 / max(h, w)) if max(h, w) > 96 else ink  # small: fast, strokes stay joined
    inked = np.greater(small, _BOX_LEVEL / 2).view(np.uint8)  # (sh, sw)
    count, labels = cv2.connectedComponents(inked, connectivity=8, ltype=cv2.CV_32S)  # 0 = background
    if count <= 1:  # strokes too faint to survive the small copy: nothing to judge them by
        return ink
    kept = inked  # one blob (a digit in one stroke) is the largest one and stays: no masses needed
    if count > 2:
        mass = np.bincount(labels.ravel(), weights=small.ravel(), minlength=count)  # (count,)
        mass[0] = 0.0
        keep = (mass >= _SPECK_FRACTION * mass.max()).astype(np.uint8)
        keep[0] = 0
        if not keep[1:].all():
            kept = keep[labels]  # (sh, sw)
    if kept.shape != ink.shape:
        kept = cv2.resize(kept, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)  # (h, w)
    # Grow the kept region by a couple of pixels so that the soft edges of kept strokes stay.
    grown = cv2.dilate(kept, _GROW_KERNEL)
    return np.multiply(ink, grown, out=ink)


def _polarity(levels: npt.NDArray[Any], full: float) -> bool:
    """Whether the paper is light (dark ink), judged from the border (mostly paper) against the
    pixels farthest from it: ink darker than the paper, even in a dim photo, is inverted.

    `levels`, `full`: as `_levels` returns them. Integer levels are ranked by a histogram of them:
    dividing by `full` keeps their order, so the order statistics are those of the grey image."""
    border = max(1, round(0.05 * min(levels.shape)))
    frame = np.concatenate(
        [
            levels[:border].ravel(),
            levels[-border:].ravel(),
            levels[:, :border].ravel(),
            levels[:, -border:].ravel(),
        ]
    )
    if levels.dtype.kind == "u":
        (paper,) = _level_quantiles(frame, (0.5,), full)
        darkest, brightest = _level_quantiles(levels, (0.005, 0.995), full)
    else:  # float32 in [0, 1] already
        (paper,) = _quantiles(frame, (0.5,))
        darkest, brightest = _quantiles(levels, (0.005, 0.995))
    dark_ink, bright_ink = paper - darkest, brightest - paper
    return dark_ink > bright_ink or (dark_ink == bright_ink and paper > 0.5)


def _level_quantiles(levels: npt.NDArray[Any], qs: tuple[float, ...], full: float) -> list[float]:
    """`_quantiles` of `levels / full` (as float32, as `_to_float` makes them) for unsigned integer
    levels, read from their histogram (or a sort of a few): the same ranks, the same values, no float
    image needed."""
    values = levels.reshape(-1)
    ranks = [round(q * (values.size - 1)) for q in qs]
    if values.size <= _SORT_SMALL:  # a 28x28 digit: a sort takes half the histogram's time
        ordered = np.sort(values)
        return [float(np.float32(ordered[k]) / np.float32(full)) for k in ranks]
    if values.dtype == np.uint8:
        counts = cv2.calcHist([values], [0], None, [256], [0, 256]).reshape(-1)  # (256,)
    else:
        counts = np.bincount(values, minlength=1)  # (max + 1,)
    below = np.cumsum(counts, dtype=np.float64)  # levels up to and including each level
    return [float(np.float32(np.searchsorted(below, k, side="right")) / np.float32(full)) for k in ranks]


def to_mnist(img: Image.Image) -> FloatImage:
    """Bring a photo or scan of one digit into MNIST form: a (28, 28) float32 array in [0, 1], white
    ink on black, the digit fitted into 20x20 and centred by its centre of mass.

    Raises PreprocessError(422) when no digit stands out from the background (a blank page): a
    prediction for an empty field would be meaningless.
    """
    # (h, w): alpha composited over white paper; a 12-megapixel photo needs no more detail than this
    return _mnist_form(*_levels(img, background=1.0, max_side=_WORK_SIDE))


def _mnist_form(levels: npt.NDArray[Any], full: float) -> FloatImage:
    """`to_mnist` from the grey levels on: `levels` and `full` as `_levels` returns them."""
    light_paper = _polarity(levels, full)
    # From here on each step writes over a buffer the steps after it no longer read: a new array
    # of 200 KB to 800 KB costs more (the allocator maps and faults in fresh pages) than the step.
    grey = _to_float(levels, full)
    ink = np.subtract(np.float32(1.0), grey, out=grey) if light_paper else grey

    # Remove the background tone (uneven lighting included), then the noise floor; stretch the ink to 1.
    background = _background(ink)
    residual = np.subtract(ink, background, out=ink)
    if light_paper:  # light falls on paper and ink alike: divide by the local paper brightness
        paper_light = np.subtract(np.float32(1.0), background, out=background)
        residual /= np.maximum(paper_light, np.float32(0.05), out=paper_light)
    # The paper, now flat, is the median; the noise is the median absolute deviation from it. Both
    # are read from every other row and column of a large image (`_statistics_sample`).
    sample = _statistics_sample(residual)
    (level,) = _quantiles(sample, (0.5,))
    (deviation,) = _quantiles(np.abs(sample - np.float32(level)), (0.5,))
    noise = 1.4826 * deviation
    floor = level + _NOISE_FLOOR * noise
    strokes = residual[residual > floor]
    top = _quantiles(strokes, (0.95,))[0] if strokes.size else level
    if top - level < max(_MIN_CONTRAST, _MIN_SNR * noise):
        raise PreprocessError(422, "No digit found: nothing in the image stands out from the background.")
    residual -= np.float32(floor)
    residual *= np.float32(1 / (top - floor))
    ink = np.clip(residual, 0.0, 1.0, out=residual)
    ink = _drop_specks(ink)

    # Crop to the ink's bounding box and fit it into 20x20, keeping the aspect ratio.
    left, top_row, dw, dh = cv2.boundingRect(np.greater(ink, _BOX_LEVEL).view(np.uint8))
    if dw == 0:
        raise PreprocessError(422, "No digit found: nothing in the image stands out from the background.")
    digit = ink[top_row : top_row + dh, left : left + dw]
    scale = DIGIT_BOX / max(dh, dw)
    size = (max(1, min(DIGIT_BOX, round(dw * scale))), max(1, min(DIGIT_BOX, round(dh * scale))))
    # Area interpolation: shrinking averages the ink under each target pixel (anti-aliasing, as MNIST's
    # fit did); enlarging by a whole factor repeats pixels (a 1x10 stroke becomes exactly 2x20).
    digit = np.clip(cv2.resize(digit, size, interpolation=cv2.INTER_AREA), 0.0, 1.0)  # (<=20, <=20)
    peak = float(digit.max())
    if peak <= 0.0:
        raise PreprocessError(422, "No digit found: nothing in the image stands out from the background.")
    # Averaging dims a stroke's core a little wherever it is not a whole target pixel wide; MNIST's
    # digits reach full white (90 % of them have a pixel at 255), so the brightest pixel is 1 here too.
    digit /= np.float32(peak)

    # Paste into 28x28 so that the centre of mass lands on (14, 14), staying inside the field. The
    # centre from sums, not cv2.moments: that reads an array two columns wide as a list of 2-D points
    # (a contour), which puts a 20x2 stroke elsewhere and gives a 1x2 or 2x2 one no mass at all.
    sh, sw = digit.shape
    mass = float(digit.sum(dtype=np.float64))
    cy = float(digit.sum(axis=1, dtype=np.float64) @ np.arange(sh)) / mass
    cx = float(digit.sum(axis=0, dtype=np.float64) @ np.arange(sw)) / mass
    paste_row = min(max(round(IMAGE_SIZE / 2 - cy), 0), IMAGE_SIZE - sh)
    paste_col = min(max(round(IMAGE_SIZE / 2 - cx), 0), IMAGE_SIZE - sw)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    out[paste_row : paste_row + sh, paste_col : paste_col + sw] = digit
    return out


# ------------------------------------------------------------------------------------------- entry points


def preprocess_bytes(data: bytes, *, mode: Mode, max_pixels: int) -> FloatImage:
    """An uploaded image as the model's (28, 28) float32 input in [0, 1].

    mode="mnist": any photo or scan, brought to MNIST form by `to_mnist`.
    mode="fashion": a product photo, brought to Fashion-MNIST form by `to_fashion` (end of this file).
    mode="none": an image that is already MNIST-like (28x28, white digit on black); its grey levels
    are taken as they are (8-bit / 255, 16-bit / 65535, alpha over black).
    """
    if mode not in MODES:
        modes = "'mnist', 'fashion' or 'none'"
        raise PreprocessError(422, f"Unknown preprocess mode {_describe(mode)}: use {modes}.")
    if mode == "mnist":
        if (plain := _plain_grey_png(data, None, max_pixels, _PNG_INERT_CHUNKS)) is not None:
            return _mnist_form(_within(plain, _WORK_SIDE), 255.0)  # what Pillow's path gives, sooner
        return to_mnist(decode_image(data, max_pixels=max_pixels, work_side=_WORK_SIDE))
    if mode == "fashion":
        return to_fashion(decode_image(data, max_pixels=max_pixels, work_side=_WORK_SIDE))
    plain = _plain_grey_png(data, IMAGE_SIZE, max_pixels)
    if plain is not None:
        return _to_float(plain, 255.0)
    img = decode_image(data, max_pixels=max_pixels, exact_size=IMAGE_SIZE)  # (EXIF keeps a square square)
    grey = _grey(img, background=0.0)
    return np.ascontiguousarray(grey, dtype=np.float32)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that carry no pixel information: a PNG with any other (transparency, palette, gamma,
# significant bits, EXIF orientation ...) takes Pillow's path, which knows what they mean.
_PNG_TEXT_CHUNKS = frozenset((b"tEXt", b"zTXt", b"iTXt", b"pHYs", b"tIME"))
# Where the image may be rotated by what it says of itself, text is out too: Pillow reads an EXIF or
# XMP orientation from a text chunk, and `preprocess=mnist` turns the image as it says.
_PNG_INERT_CHUNKS = frozenset((b"pHYs", b"tIME"))


def _plain_grey_png(
    data: bytes, side: int | None, max_pixels: int, chunks: frozenset[bytes] = _PNG_TEXT_CHUNKS
) -> npt.NDArray[np.uint8] | None:
    """The pixels of a PNG in the form MNIST digits are usually sent (8-bit grey, not interlaced, no
    chunk that changes what a pixel means; `side` x `side` unless `side` is None, and no more than
    `max_pixels`), decoded by OpenCV; None for any other input, which Pillow's path then decodes or
    refuses. `chunks`: the ancillary chunks it may hold besides.

    For the 28x28 digits Pillow's open, load, copy and EXIF look-up cost several times OpenCV's
    decode, and more so where inference has just filled the caches. The structure, every chunk's CRC,
    the inflated size and the row filters are checked here first, so libpng is only handed files it
    decodes without complaint (on a corrupt file it would print to stderr, past our logging); the
    pixels are the same either way (lossless, tested bit for bit)."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, end, idat = len(_PNG_SIGNATURE), len(data), []
    while pos + 12 <= end:
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        body_end = pos + 8 + length
        if body_end + 4 > end:
            return None
        (crc,) = struct.unpack_from(">I", data, body_end)
        if zlib.crc32(memoryview(data)[pos + 4 : body_end]) != crc:
            return None
        if pos == len(_PNG_SIGNATURE):  # IHDR first: the size and the pixel format
            if kind != b"IHDR" or length != 13:
                return None
            width, height, *form = struct.unpack_from(">IIBBBBB", data, pos + 8)
            if form != [8, 0, 0, 0, 0] or not 0 < width * height <= max_pixels:
                return None
            if side is not None and (width, height) != (side, side):
                return None
        elif kind == b"IDAT":
            idat.append(memoryview(data)[pos + 8 : body_end])
        elif kind == b"IEND":
            break
        elif kind not in chunks:
            return None
        pos = body_end + 4
    else:
        return None  # no IEND
    inflate, size = zlib.decompressobj(), height * (width + 1)  # each row: its filter byte, its pixels
    try:
        rows = inflate.decompress(b"".join(idat), size + 1)
    except zlib.error:
        return None
    if not inflate.eof or len(rows) != size or max(rows[:: width + 1]) > 4:
        return None  # short, long or trailing data, or a row filter that does not exist
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.shape != (height, width) or pixels.dtype != np.uint8:
        return None
    return np.asarray(pixels, dtype=np.uint8)


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


NUMBER_TYPES = frozenset((int, float))  # what JSON numbers parse to; bool, a subclass of int, is left out


def numbers_only(values: list[Any]) -> bool:
    """Whether every item is a plain int or float (not a bool), checked in C: a list of 784 pixels
    in about a tenth of the time of an isinstance test on each."""
    return NUMBER_TYPES.issuperset(map(type, values))


def _number_row(row: object, size: int) -> bool:
    return type(row) is list and len(row) == size and numbers_only(row)


def validate_array(obj: object, *, size: int = IMAGE_SIZE) -> FloatImage:
    """A JSON image (`size` rows of `size` finite numbers in [0, 1]) as a float32 (size, size) array.

    Booleans, strings, None, NaN, infinities and out-of-range values are refused with a 422 whose
    detail says what was wrong and where (row and column, counted from 0).
    """
    if isinstance(obj, list) and len(obj) == size and all(_number_row(row, size) for row in obj):
        # The common case, checked in C: rows of plain numbers. np.array takes them as float64, as
        # the loop below reads them, so float32 comes from the same double either way.
        try:
            grid = np.array(obj, dtype=np.float64)
        except OverflowError:  # an integer beyond float64: the loop below says where
            pass
        else:
            if ((grid >= 0) & (grid <= 1)).all():  # False for NaN too
                return grid.astype(np.float32)
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


# ---------------------------------------------------------------------------------- Fashion-MNIST procedure

Mode = Literal["mnist", "fashion", "none"]  # what preprocess_bytes takes; a model names its default
MODES: tuple[Mode, ...] = ("mnist", "fashion", "none")
_TRIM_DISTANCE = 0.05  # Zalando's trim: a pixel within 5 % of the full range of the corners' grey is edge


def to_fashion(img: Image.Image) -> FloatImage:
    """Bring a product photo into Fashion-MNIST form, as Zalando made it (github.com/zalandoresearch/
    fashion-mnist, "How to make it"): a (28, 28) float32 array in [0, 1] of 8-bit levels, the product
    bright on black, its longest side 28 pixels, centred.

    1. Trim the edges whose pixels are all within 5 % of the full grey range of the corners' grey (the
       median of the four corner pixels: the background, even where the product touches a corner).
    2. Resize so that the longest side is 28, keeping the aspect ratio (area averaging: Zalando skipped
       rows and columns, which aliases a photo's texture and JPEG noise into the 28 pixels).
    3. Extend the short side to 28 with the background, the product in the centre (an odd margin puts
       its extra pixel above or left, as Fashion-MNIST's images have it).
    4. Negate: on a light background each pixel becomes (background - grey) / background, so a white
       background turns black and a product on off-white paper comes out as on white (1 - grey for a
       white background: Zalando's negation). An image on a dark background (the web page's drawing
       pad, a Fashion-MNIST image itself) is already bright on black and is only rescaled,
       (grey - background) / (1 - background).
    5. Round to 8-bit grey levels, as Fashion-MNIST's images are.

    Zalando's sharpening between 2 and 3 (a Gaussian of radius and sigma 1 "with increasing effect near
    outlines", an ImageMagick operator whose strength the procedure does not give) is left out. Colour
    is judged as grey levels (Pillow's luma): a large JPEG is decoded at reduced scale as grey.

    Raises PreprocessError(422) when nothing differs from the corners (a blank image).
    """
    levels, full = _levels(img, background=1.0, max_side=_WORK_SIDE)  # (h, w), alpha over white
    grey = _to_float(levels, full)
    corners = np.array([grey[0, 0], grey[0, -1], grey[-1, 0], grey[-1, -1]], dtype=np.float32)
    background = np.float32(np.median(corners))
    product = np.greater(np.abs(grey - background), np.float32(_TRIM_DISTANCE)).view(np.uint8)  # (h, w)
    left, top, pw, ph = cv2.boundingRect(product)
    if pw == 0:
        raise PreprocessError(422, "No object found: every pixel is within 5 % of the corners' grey.")
    crop = grey[top : top + ph, left : left + pw]
    scale = IMAGE_SIZE / max(ph, pw)
    size = (max(1, min(IMAGE_SIZE, round(pw * scale))), max(1, min(IMAGE_SIZE, round(ph * scale))))
    small = np.asarray(cv2.resize(crop, size, interpolation=cv2.INTER_AREA), dtype=np.float32)  # (sh, sw)
    sh, sw = small.shape
    field = np.full((IMAGE_SIZE, IMAGE_SIZE), background, dtype=np.float32)
    row, col = (IMAGE_SIZE - sh + 1) // 2, (IMAGE_SIZE - sw + 1) // 2  # odd: the extra pixel above/left
    field[row : row + sh, col : col + sw] = small
    if background >= 0.5:  # light background, dark product: negate
        bright = (background - field) / max(background, np.float32(1e-6))
    else:  # already bright on dark
        bright = (field - background) / max(np.float32(1.0) - background, np.float32(1e-6))
    levels8 = np.rint(np.clip(bright, 0.0, 1.0) * np.float32(255.0))
    return np.ascontiguousarray(levels8 / np.float32(255.0), dtype=np.float32)
