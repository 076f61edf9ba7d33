"""capsnet.service.preprocess: the MNIST procedure on photos, and every kind of bad input mapped to its
status."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from capsnet.model_export.data import load_split
from capsnet.service.preprocess import (
    _PNG_INERT_CHUNKS,
    _WORK_SIDE,
    PreprocessError,
    _grey,
    _plain_grey_png,
    decode_image,
    header_pixels,
    preprocess_bytes,
    to_mnist,
    validate_array,
)
from tests.service.photos import render_photo

MAX_PIXELS = 4_000_000


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    return load_split("mnist", "test")


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def paper_digit(digit: np.ndarray, side: int = 112) -> Image.Image:
    """A clean scan: dark ink on white paper, `side` pixels square."""
    return Image.fromarray(255 - digit).resize((side, side), Image.Resampling.BICUBIC)


def centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(a.shape)
    return float((rows * a).sum() / a.sum()), float((cols * a).sum() / a.sum())


def ink_box(a: np.ndarray, level: float = 0.0) -> tuple[int, int]:
    rows = np.flatnonzero((a > level).any(axis=1))
    cols = np.flatnonzero((a > level).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def aligned_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation over shifts of up to one pixel: MNIST rounded each centring to whole pixels."""
    best = -1.0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = np.roll(np.roll(a, dy, axis=0), dx, axis=1)
            best = max(best, float(np.corrcoef(shifted.ravel(), b.ravel())[0, 1]))
    return best


# ------------------------------------------------------------------------------------ the MNIST procedure


@pytest.mark.parametrize("index", range(12))
def test_photo_comes_back_as_the_mnist_digit(mnist: tuple[np.ndarray, np.ndarray], index: int) -> None:
    images, _ = mnist
    rng = np.random.default_rng(index)
    photo = render_photo(images[index], rng, canvas=(300, 224), scale=7.0, noise=0.03, quality=75)
    out = to_mnist(decode_image(photo, max_pixels=MAX_PIXELS))
    original = images[index].astype(np.float32) / 255

    assert out.shape == (28, 28) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() == pytest.approx(1.0, abs=0.05)
    cy, cx = centre_of_mass(out)
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    h, w = ink_box(out)
    assert max(h, w) <= 20 and max(ink_box(out, 0.1)) >= 18  # fitted into 20x20, filling it
    assert aligned_correlation(out, original) > 0.85
    assert np.abs(out.sum() - original.sum()) / original.sum() < 0.3  # about as much ink


def test_raw_mnist_digit_is_a_fixed_point(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = mnist
    for digit in images[:20]:
        out = to_mnist(Image.fromarray(digit))
        assert aligned_correlation(out, digit / 255) > 0.97


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_polarity_white_on_black_and_black_on_white_agree(
    mnist: tuple[np.ndarray, np.ndarray], index: int
) -> None:
    digit = np.asarray(paper_digit(mnist[0][index]))  # black on white
    black_on_white = to_mnist(Image.fromarray(digit))
    white_on_black = to_mnist(Image.fromarray(255 - digit))
    np.testing.assert_allclose(black_on_white, white_on_black, atol=1e-5)
    assert black_on_white.max() == pytest.approx(1.0)


@pytest.mark.parametrize(("paper", "ink"), [(0.35, 0.08), (0.3, 0.8), (0.55, 0.95), (0.9, 0.5)])
def test_polarity_follows_the_paper_not_a_fixed_grey_level(
    mnist: tuple[np.ndarray, np.ndarray], paper: float, ink: float
) -> None:
    """A dim photo (dark grey paper, darker ink), chalk on a board, light ink on grey, faint pencil."""
    digit = np.asarray(paper_digit(mnist[0][0]), dtype=np.float64) / 255  # 1 = paper, 0 = ink
    page = np.full((160, 200), paper)
    page[20:132, 50:162] = ink + (paper - ink) * digit
    out = to_mnist(Image.fromarray(np.round(page * 255).astype(np.uint8)))
    assert aligned_correlation(out, to_mnist(paper_digit(mnist[0][0]))) > 0.95


def test_speck_in_a_corner_does_not_change_the_crop(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    photo = np.asarray(
        decode_image(render_photo(mnist[0][0], np.random.default_rng(5), quality=None), max_pixels=MAX_PIXELS)
    ).copy()
    clean = to_mnist(Image.fromarray(photo))
    photo[4:10, 4:10] = 20  # a dark speck, 6x6 pixels, far from the digit
    specked = to_mnist(Image.fromarray(photo))
    assert np.abs(specked - clean).max() < 0.02
    assert ink_box(specked) == ink_box(clean)


def test_uneven_lighting_is_removed(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    digit = np.asarray(paper_digit(mnist[0][0], side=200), dtype=np.float64) / 255
    ramp = np.linspace(0.35, 1.0, 300)[None, :]  # light falls off across the page
    page = np.ones((200, 300))
    page[:, 60:260] = digit
    shaded = Image.fromarray((page * ramp * 255).astype(np.uint8))
    out = to_mnist(shaded)
    expected = to_mnist(Image.fromarray((page * 255).astype(np.uint8)))
    assert aligned_correlation(out, expected) > 0.95
    assert np.abs(out - expected).mean() < 0.03  # no shadow survives as ink, no stroke fades


def test_blank_page_has_no_digit() -> None:
    rng = np.random.default_rng(0)
    paper = np.clip(rng.normal(200, 6, size=(240, 320)), 0, 255).astype(np.uint8)
    for img in (Image.fromarray(paper), Image.new("L", (64, 64), 255), Image.new("RGB", (30, 30), "black")):
        with pytest.raises(PreprocessError) as err:
            to_mnist(img)
        assert err.value.status_code == 422 and "No digit found" in err.value.detail


def test_large_photo_is_handled(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    page = np.full((2400, 3200), 210, dtype=np.uint8)
    page[900:1300, 1500:1900] = np.asarray(paper_digit(mnist[0][0], side=400)).astype(np.int64) * 210 // 255
    out = to_mnist(Image.fromarray(page))
    assert aligned_correlation(out, mnist[0][0] / 255) > 0.9


@pytest.mark.parametrize(
    "stroke", [(slice(1000, 2000), 1500), (1500, slice(1400, 1410)), (slice(0, 3000), slice(0, 2))]
)
def test_thin_strokes_in_a_large_image(stroke: tuple[slice | int, slice | int]) -> None:
    page = np.full((3000, 3000), 230, dtype=np.uint8)
    page[stroke] = 0
    out = to_mnist(Image.fromarray(page))
    assert out.max() == pytest.approx(1.0) and max(ink_box(out)) <= 20


@pytest.mark.parametrize(("height", "width"), [(20, 2), (2, 2), (1, 2), (2, 20), (9, 1)])
def test_a_narrow_stroke_is_centred_on_its_mass(height: int, width: int) -> None:
    """Boxes two pixels wide too: OpenCV's moments read such an array as a list of points, which put
    a 20x2 stroke off centre and gave a 2x2 dot no mass (a 500 before)."""
    page = np.full((28, 28), 230, dtype=np.uint8)
    page[4 : 4 + height, 3 : 3 + width] = 0
    out = to_mnist(Image.fromarray(page))
    rows, cols = np.indices(out.shape)
    mass = out.sum()
    assert out.max() == pytest.approx(1.0)
    # the centre of mass within half a pixel of (14, 14), where the paste puts it (rounded to a pixel)
    assert abs((out * rows).sum() / mass - 14) <= 0.5 and abs((out * cols).sum() / mass - 14) <= 0.5


def test_exif_rotated_jpeg_is_turned_upright(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    upright = paper_digit(mnist[0][0], side=140).crop((0, 0, 140, 100)).resize((280, 200))
    stored = upright.rotate(90, expand=True)  # the camera stored it on its side: 200 wide, 280 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(stored, "JPEG", quality=90, exif=exif.tobytes())
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    assert decoded.size == (280, 200)
    expected = to_mnist(Image.open(io.BytesIO(encode(upright, "JPEG", quality=90))))
    assert aligned_correlation(to_mnist(decoded), expected) > 0.95


# ----------------------------------------------------------------------- image modes that must succeed


def _modes(digit: np.ndarray) -> dict[str, bytes]:
    """The digit (black on white, 112 px) encoded in the modes and formats users send."""
    paper = paper_digit(digit)
    grey = np.asarray(paper)
    ink = 255 - grey
    rgba = np.zeros((*grey.shape, 4), dtype=np.uint8)
    rgba[..., 3] = ink  # black ink on a transparent canvas (a drawing app)
    la = np.stack([np.zeros_like(grey), ink], axis=-1)
    palette = paper.convert("RGB").quantize(16)
    transparent_gif = paper.convert("P")
    transparent_gif.info["transparency"] = 255
    frames = [paper, Image.new("L", paper.size, 255), Image.fromarray(255 - grey)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    tiff = io.BytesIO()
    frames[0].save(tiff, "TIFF", save_all=True, append_images=frames[1:])
    return {
        "png-L": encode(paper, "PNG"),
        "png-16bit": encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        "tiff-16bit": encode(Image.fromarray(grey.astype(np.uint16) * 257), "TIFF"),
        "png-RGB": encode(paper.convert("RGB"), "PNG"),
        "png-RGBA-transparent-canvas": encode(Image.fromarray(rgba), "PNG"),
        "png-LA": encode(Image.fromarray(la), "PNG"),
        "png-palette": encode(palette, "PNG"),
        "png-1bit": encode(paper.point(lambda v: 255 if v > 128 else 0).convert("1"), "PNG"),
        "gif-palette-transparency": encode(transparent_gif, "GIF", transparency=255),
        "gif-multiframe": gif.getvalue(),
        "tiff-multipage": tiff.getvalue(),
        "jpeg-CMYK": encode(paper.convert("CMYK"), "JPEG", quality=95),
        "tiff-CMYK": encode(paper.convert("CMYK"), "TIFF"),
        "jpeg-RGB": encode(paper.convert("RGB"), "JPEG", quality=90),
        "bmp-L": encode(paper, "BMP"),
        "bmp-RGB": encode(paper.convert("RGB"), "BMP"),
        "webp-lossless": encode(paper.convert("RGB"), "WEBP", lossless=True),
        "webp-lossy": encode(paper.convert("RGB"), "WEBP", quality=90),
    }


MODE_NAMES = list(_modes(np.zeros((28, 28), dtype=np.uint8)))


@pytest.mark.parametrize("name", MODE_NAMES)
def test_every_mode_gives_the_same_digit(mnist: tuple[np.ndarray, np.ndarray], name: str) -> None:
    digit = mnist[0][0]
    reference = to_mnist(paper_digit(digit))
    out = preprocess_bytes(_modes(digit)[name], mode="mnist", max_pixels=MAX_PIXELS)
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert aligned_correlation(out, reference) > 0.9  # 1-bit and lossy formats lose the grey edges
    assert aligned_correlation(out, digit / 255) > 0.9


# ------------------------------------------------------------------------------- mode "none" (as-is)


def test_mode_none_takes_28x28_grey_levels_as_they_are(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    digit = mnist[0][0]
    out = preprocess_bytes(encode(Image.fromarray(digit), "PNG"), mode="none", max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(out, digit.astype(np.float32) / 255)
    assert out.dtype == np.float32

    sixteen = digit.astype(np.uint16) * 257
    out16 = preprocess_bytes(encode(Image.fromarray(sixteen), "PNG"), mode="none", max_pixels=MAX_PIXELS)
    np.testing.assert_allclose(out16, digit / 255, atol=1e-6)

    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = digit  # white ink on a transparent canvas: transparent means MNIST's black
    out_a = preprocess_bytes(encode(Image.fromarray(rgba), "PNG"), mode="none", max_pixels=MAX_PIXELS)
    np.testing.assert_allclose(out_a, digit / 255, atol=1 / 255)


def pillow_none(data: bytes) -> np.ndarray:
    """Mode "none" through Pillow alone: what the OpenCV path for plain grey PNGs must equal."""
    return _grey(decode_image(data, max_pixels=MAX_PIXELS, exact_size=28), background=0.0)


def grey_png(pixels: np.ndarray, *chunks: bytes, filters: bytes | None = None, level: int = 6) -> bytes:
    """An 8-bit grey PNG of `pixels` built by hand: `chunks` go between IHDR and IDAT, `filters` are
    the row filter bytes (default: none), whose pixel bytes stay raw (a filter of 0 is the only one
    that needs no arithmetic, so a wrong filter byte is a corrupt file here, not a different image)."""
    h, w = pixels.shape
    flags = filters if filters is not None else bytes(h)
    raw = b"".join(bytes([flags[y]]) + pixels[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + b"".join(chunks)
        + png_chunk(b"IDAT", zlib.compress(raw, level))
        + png_chunk(b"IEND", b"")
    )


def test_plain_grey_pngs_decode_through_opencv_bit_for_bit_as_through_pillow(
    mnist: tuple[np.ndarray, np.ndarray], monkeypatch
) -> None:
    images = mnist[0][:40]
    files = [encode(Image.fromarray(d), "PNG", optimize=k % 2 == 0, compress_level=k % 10) for k, d in
             enumerate(images)]  # fmt: skip
    files += [grey_png(images[0], png_chunk(b"tEXt", b"Comment\x00a seven"), png_chunk(b"pHYs", bytes(9)))]
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    outs = [preprocess_bytes(f, mode="none", max_pixels=MAX_PIXELS) for f in files]
    assert opened == []  # not one of them went through Pillow
    monkeypatch.undo()
    for f, out, digit in zip(files, outs, [*images, images[0]], strict=True):
        assert out.dtype == np.float32 and out.shape == (28, 28)
        np.testing.assert_array_equal(out, pillow_none(f))
        np.testing.assert_array_equal(out, digit.astype(np.float32) / 255)


def pillow_mnist(data: bytes) -> np.ndarray:
    """Mode "mnist" through Pillow's decoding: what the OpenCV path for plain grey PNGs must equal."""
    return to_mnist(decode_image(data, max_pixels=MAX_PIXELS, work_side=_WORK_SIDE))


def test_plain_grey_pngs_of_any_size_give_mode_mnist_byte_for_byte_as_through_pillow(
    mnist: tuple[np.ndarray, np.ndarray], monkeypatch
) -> None:
    digits = mnist[0][:30]
    pages = [
        np.asarray(paper_digit(d, side)) for d, side in zip(digits[:4], (40, 112, 227, 700), strict=True)
    ]
    wide = np.asarray(paper_digit(digits[5], 300).resize((600, 300)))  # wider than the working side
    images = [*digits, *pages, wide]
    files = [encode(Image.fromarray(a), "PNG", optimize=k % 2 == 0, compress_level=k % 10) for k, a in
             enumerate(images)]  # fmt: skip
    files += [grey_png(pages[1], png_chunk(b"pHYs", bytes(9)))]  # an inert chunk
    want = [pillow_mnist(f) for f in files]
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    got = [preprocess_bytes(f, mode="mnist", max_pixels=MAX_PIXELS) for f in files]
    assert opened == []  # not one of them went through Pillow
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32 and g.shape == (28, 28) and g.tobytes() == w.tobytes()
    assert max(pages[3].shape) > _WORK_SIDE  # (the 700-pixel page is reduced on the way, as Pillow's is)


def test_a_plain_grey_png_with_text_or_more_pixels_than_allowed_takes_pillows_path_in_mode_mnist(
    mnist: tuple[np.ndarray, np.ndarray],
) -> None:
    page = np.asarray(paper_digit(mnist[0][0], 112))
    xmp = (
        b'XML:com.adobe.xmp\x00\x00\x00\x00\x00<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    )
    turned = grey_png(page, png_chunk(b"iTXt", xmp))
    assert _plain_grey_png(turned, None, MAX_PIXELS, _PNG_INERT_CHUNKS) is None
    assert (
        preprocess_bytes(turned, mode="mnist", max_pixels=MAX_PIXELS).tobytes()
        == pillow_mnist(turned).tobytes()
    )
    plain = grey_png(page)
    assert _plain_grey_png(plain, None, 112 * 112 - 1, _PNG_INERT_CHUNKS) is None
    with pytest.raises(PreprocessError) as err:
        preprocess_bytes(plain, mode="mnist", max_pixels=112 * 112 - 1)
    assert err.value.status_code == 413


def outcome(fn, data: bytes) -> np.ndarray | tuple[int, str]:
    try:
        return fn(data)
    except PreprocessError as err:
        return err.status_code, err.detail


def raw_png(raw: bytes, *, side: int = 28) -> bytes:
    """A 28x28 grey PNG whose IDAT inflates to `raw` (filter bytes and pixels, right or wrong)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "kind",
    ["transparency", "gamma", "16-bit", "interlaced", "palette", "rgb", "exif orientation", "bad filter",
     "short rows", "long rows", "no IEND", "bad CRC", "not zlib"],
)  # fmt: skip
def test_other_pngs_take_pillows_path_and_corrupt_ones_are_refused_quietly(
    mnist: tuple[np.ndarray, np.ndarray], kind: str, capfd
) -> None:
    """Whatever the OpenCV path declines gets Pillow's answer, pixels or refusal, as before it existed;
    and libpng, which prints to stderr about a corrupt file, is never handed one."""
    digit = mnist[0][0]
    good = grey_png(digit)
    rows = b"".join(b"\x00" + digit[y].tobytes() for y in range(28))
    turned = Image.Exif()
    turned[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    interlaced = bytearray(encode(Image.fromarray(digit), "PNG"))
    interlaced[28] = 1  # Adam7; its header CRC made right again below
    interlaced[29:33] = struct.pack(">I", zlib.crc32(bytes(interlaced[12:29])))
    data = {
        "transparency": grey_png(digit, png_chunk(b"tRNS", b"\x00\x00")),  # black is transparent
        "gamma": grey_png(digit, png_chunk(b"gAMA", struct.pack(">I", 45455))),
        "16-bit": encode(Image.fromarray(digit.astype(np.uint16) * 257), "PNG"),
        "interlaced": bytes(interlaced),
        "palette": encode(Image.fromarray(digit).convert("P"), "PNG"),
        "rgb": encode(Image.fromarray(digit).convert("RGB"), "PNG"),
        "exif orientation": encode(Image.fromarray(digit), "PNG", exif=turned),
        "bad filter": grey_png(digit, filters=bytes([7] * 28)),
        "short rows": raw_png(rows[:-1]),
        "long rows": raw_png(rows + b"\x00" * 29),
        "no IEND": good[:-12],
        "bad CRC": good[:-16] + bytes([good[-16] ^ 1]) + good[-15:],
        "not zlib": good[:33] + png_chunk(b"IDAT", b"\x00" * 40) + png_chunk(b"IEND", b""),
    }[kind]
    assert _plain_grey_png(data, 28, MAX_PIXELS) is None
    assert _plain_grey_png(data, None, MAX_PIXELS, _PNG_INERT_CHUNKS) is None
    got = outcome(lambda d: preprocess_bytes(d, mode="none", max_pixels=MAX_PIXELS), data)
    want = outcome(pillow_none, data)
    if isinstance(want, tuple):
        assert got == want and want[0] == 400
    else:
        np.testing.assert_array_equal(got, want)
    got_mnist = outcome(lambda d: preprocess_bytes(d, mode="mnist", max_pixels=MAX_PIXELS), data)
    want_mnist = outcome(pillow_mnist, data)
    if isinstance(want_mnist, tuple):
        assert got_mnist == want_mnist
    else:
        assert got_mnist.tobytes() == want_mnist.tobytes()
    if kind == "exif orientation":
        np.testing.assert_array_equal(got, np.rot90(digit, -1).astype(np.float32) / 255)
    if kind == "transparency":  # black is transparent, composited over MNIST's black: unchanged
        np.testing.assert_array_equal(got, digit.astype(np.float32) / 255)
    out, err_text = capfd.readouterr()
    assert out == "" and err_text == ""


@pytest.mark.parametrize("size", [(27, 28), (28, 29), (56, 56), (1, 1)])
def test_mode_none_refuses_other_sizes(size: tuple[int, int]) -> None:
    with pytest.raises(PreprocessError) as err:
        preprocess_bytes(encode(Image.new("L", size), "PNG"), mode="none", max_pixels=MAX_PIXELS)
    assert err.value.status_code == 422
    assert f"got {size[0]}x{size[1]}" in err.value.detail and "preprocess=mnist" in err.value.detail


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(PreprocessError) as err:
        preprocess_bytes(encode(Image.new("L", (28, 28)), "PNG"), mode="fancy", max_pixels=MAX_PIXELS)  # type: ignore[arg-type]
    assert err.value.status_code == 422


# ----------------------------------------------------------------------------- the bad-input corpus


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def handmade_png(width: int, height: int, idat: bytes | None = None, *, bit_depth: int = 8) -> bytes:
    """A greyscale PNG whose header claims width x height; the pixel data is whatever `idat` holds.
    A bomb: a few KB of zlib that would inflate to gigabytes, never decoded because the header is."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(b"\x00" * min(width + 1, 1 << 16) * 64, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def handmade_gif(width: int, height: int, frame: tuple[int, int] = (1, 1)) -> bytes:
    """A GIF whose logical screen claims width x height, holding one frame of `frame` pixels."""
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", width, height, 0x80, 0, 0)
        + b"\x00\x00\x00\xff\xff\xff"
        + b","
        + struct.pack("<HHHHB", 0, 0, *frame, 0)
        + b"\x02\x02\x44\x01\x00;"
    )


def handmade_bmp(width: int, height: int) -> bytes:
    """A 24-bit BMP header claiming width x height, with one row of pixel data."""
    pixels = b"\x00" * 64
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(pixels), 0, 0, 54) + header + pixels


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame size in a JPEG's SOF0 marker."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def corrupt(data: bytes, start: int, length: int = 24) -> bytes:
    out = bytearray(data)
    for k in range(start, min(len(out), start + length)):
        out[k] ^= 0xA5
    return bytes(out)


def _sample(fmt: str, **params: object) -> bytes:
    img = Image.fromarray((np.indices((48, 64)).sum(0) * 7 % 256).astype(np.uint8))
    return encode(img if fmt != "WEBP" else img.convert("RGB"), fmt, **params)


PNG, JPEG, GIF, BMP, TIFF, WEBP = (_sample(f) for f in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"))

BAD_IMAGES: dict[str, tuple[bytes, int]] = {
    # empty
    "empty": (b"", 400),
    # not an image, or not a supported one
    "text": (b"hello, this is not an image\n", 415),
    "json": (b'{"images": [[0.5]]}', 415),
    "pdf": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF", 415),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"/>', 415),
    "html": (b"<!doctype html><html><body>7</body></html>", 415),
    "zeros": (bytes(1024), 415),
    "random": (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), 415),
    "ppm": (encode(Image.new("L", (28, 28)), "PPM"), 415),
    "ico": (encode(Image.new("RGBA", (32, 32)), "ICO"), 415),
    "tga": (encode(Image.new("L", (28, 28)), "TGA"), 415),
    "gzip-of-png": (zlib.compress(PNG), 415),
    # truncated
    "png-signature-only": (PNG[:8], 400),
    "png-truncated-header": (PNG[:20], 400),
    "png-truncated-half": (PNG[: len(PNG) // 2], 400),
    "jpeg-soi-only": (JPEG[:3], 400),
    "jpeg-truncated-half": (JPEG[: len(JPEG) // 2], 400),
    "jpeg-missing-end": (JPEG[:-40], 400),
    "gif-truncated-header": (GIF[:10], 400),
    "gif-truncated-half": (GIF[: len(GIF) // 2], 400),
    "bmp-truncated-header": (BMP[:20], 400),
    "bmp-truncated-half": (BMP[: len(BMP) // 2], 400),
    "tiff-truncated-header": (TIFF[:6], 400),
    "tiff-truncated-half": (TIFF[: len(TIFF) // 2], 400),
    "webp-truncated-half": (WEBP[: len(WEBP) // 2], 400),
    # corrupt
    "png-bad-ihdr-crc": (corrupt(PNG, 16, 4), 400),
    "png-corrupt-zlib": (handmade_png(28, 28, idat=b"\x78\x9c" + bytes(range(200))), 400),
    "jpeg-corrupt-header": (corrupt(JPEG, 20, 40), 400),
    "gif-corrupt-lzw": (GIF[:-20] + bytes(range(19)), 400),
    "bmp-corrupt-header": (corrupt(BMP, 14, 16), 400),
    "tiff-corrupt-ifd": (TIFF[:4] + struct.pack("<I", 10**9) + TIFF[8:], 400),
    "webp-corrupt": (corrupt(WEBP, 20, 40), 400),
    # a zero side
    "png-0x0": (handmade_png(0, 0), 400),
    "png-0x28": (handmade_png(0, 28), 400),
    "png-28x0": (handmade_png(28, 0), 400),
    "gif-0x0": (handmade_gif(0, 0, frame=(0, 0)), 400),
    "bmp-0x28": (handmade_bmp(0, 28), 400),
    # decompression bombs: tiny files that claim huge canvases
    "png-bomb-50000x50000": (handmade_png(50_000, 50_000), 413),
    "png-bomb-16bit-30000x30000": (handmade_png(30_000, 30_000, bit_depth=16), 413),
    "png-bomb-10000x10000": (handmade_png(10_000, 10_000), 413),  # Pillow's warning zone
    "png-over-limit-3000x3000": (handmade_png(3_000, 3_000), 413),  # over our MAX_PIXELS only
    "png-over-limit-1x5000000": (handmade_png(1, 5_000_000), 413),
    "gif-bomb-65535x65535": (handmade_gif(65_535, 65_535), 413),
    "bmp-bomb-40000x40000": (handmade_bmp(40_000, 40_000), 413),
    "jpeg-bomb-60000x60000": (with_jpeg_size(JPEG, 60_000, 60_000), 413),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_gets_its_status(name: str) -> None:
    data, status = BAD_IMAGES[name]
    with pytest.raises(PreprocessError) as err:
        preprocess_bytes(data, mode="mnist", max_pixels=MAX_PIXELS)
    assert err.value.status_code == status, err.value.detail
    detail = err.value.detail
    assert detail and "Traceback" not in detail and "/" not in detail.replace("image/", "")
    assert "BytesIO" not in detail and "object at 0x" not in detail


def test_bombs_are_small_files() -> None:
    for name, (data, status) in BAD_IMAGES.items():
        if status == 413:
            assert len(data) < 20_000, name


def test_the_samples_themselves_are_fine() -> None:
    for data in (PNG, JPEG, GIF, BMP, TIFF, WEBP):
        img = decode_image(data, max_pixels=MAX_PIXELS)
        assert img.size == (64, 48)


@pytest.mark.parametrize("size", [(1, 1), (1, 60), (60, 1), (2, 2)])
def test_tiny_images_do_not_crash(size: tuple[int, int]) -> None:
    data = encode(Image.new("L", size, 255), "PNG")
    assert decode_image(data, max_pixels=MAX_PIXELS).size == size
    with pytest.raises(PreprocessError) as err:
        preprocess_bytes(data, mode="mnist", max_pixels=MAX_PIXELS)
    assert err.value.status_code == 422  # a blank page: no digit found


def test_a_1xn_stroke_is_a_digit() -> None:
    line = np.full((1, 60), 255, dtype=np.uint8)
    line[0, 30:40] = 0
    out = preprocess_bytes(encode(Image.fromarray(line), "PNG"), mode="mnist", max_pixels=MAX_PIXELS)
    assert ink_box(out, 0.5) == (2, 20)  # 1x10 ink scaled by 2 to fit 20 wide
    assert centre_of_mass(out) == pytest.approx((14.0, 14.0), abs=0.5)


def test_max_pixels_is_exact() -> None:
    data = encode(Image.new("L", (100, 100), 255), "PNG")
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(PreprocessError) as err:
        decode_image(data, max_pixels=9_999)
    assert err.value.status_code == 413 and "100x100" in err.value.detail


# ---------------------------------------------------------------------------------------- JSON arrays


def grid(value: object = 0.5, n: int = 28, m: int = 28) -> list[list[object]]:
    return [[value] * m for _ in range(n)]


def with_pixel(value: object, i: int = 3, j: int = 7) -> list[list[object]]:
    g = grid()
    g[i][j] = value
    return g


def deeply_nested(depth: int) -> list[object]:
    obj: list[object] = [0.5]
    for _ in range(depth):
        obj = [obj]
    return obj


BAD_ARRAYS: dict[str, tuple[object, str]] = {
    "none": (None, "got NoneType"),
    "number": (0.5, "got float"),
    "string": ("0.5", "got str"),
    "dict": ({"image": grid()}, "got dict"),
    "empty-list": ([], "got 0 rows"),
    "27-rows": (grid(n=27), "got 27 rows"),
    "29-rows": (grid(n=29), "got 29 rows"),
    "784-flat": ([0.5] * 784, "got 784 rows"),
    "row-too-short": ([*grid()[:27], [0.5] * 27], "Row 27 has 27 values"),
    "row-too-long": ([[0.5] * 29, *grid()[1:]], "Row 0 has 29 values"),
    "row-not-a-list": ([0.5, *grid()[1:]], "Row 0 must be a list"),
    "row-a-string": (["x" * 28, *grid()[1:]], "Row 0 must be a list"),
    "3d": ([[[0.5]] * 28] * 28, "Pixel [0][0] must be a number"),
    "batch-of-one": ([grid()], "got 1 rows"),
    "deeply-nested": (deeply_nested(5000), "got 1 rows"),
    "string-pixel": (with_pixel("0.5"), "Pixel [3][7] must be a number"),
    "null-pixel": (with_pixel(None), "Pixel [3][7] must be a number"),
    "true-pixel": (with_pixel(True), "Pixel [3][7] must be a number in [0, 1], got bool True"),
    "false-pixel": (with_pixel(False), "got bool"),
    "dict-pixel": (with_pixel({"v": 1}), "got dict"),
    "nan": (with_pixel(math.nan), "Pixel [3][7] is not a finite number"),
    "inf": (with_pixel(math.inf), "is not a finite number"),
    "minus-inf": (with_pixel(-math.inf, 27, 27), "Pixel [27][27] is not a finite number"),
    "negative": (with_pixel(-0.01), "Pixel [3][7] is out of range: -0.01"),
    "above-one": (with_pixel(1.5), "out of range: 1.5"),
    "255": (with_pixel(255), "out of range: 255"),
    "huge-float": (with_pixel(1e308), "out of range"),
    "huge-int": (with_pixel(10**400), "out of range"),
    "tiny-negative": (with_pixel(-1e-300), "out of range"),
}


@pytest.mark.parametrize("name", list(BAD_ARRAYS))
def test_bad_array_gets_422_saying_where(name: str) -> None:
    obj, message = BAD_ARRAYS[name]
    with pytest.raises(PreprocessError) as err:
        validate_array(obj)
    assert err.value.status_code == 422
    assert message in err.value.detail
    assert len(err.value.detail) < 200  # a 400-digit number is not echoed back whole


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0, 0.25, 5e-324])
def test_good_array_is_float32(value: float) -> None:
    out = validate_array(grid(value))
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert np.all(out == np.float32(value))


def test_good_array_keeps_every_pixel_in_place() -> None:
    values = np.random.default_rng(0).random((28, 28))
    out = validate_array(values.tolist())
    np.testing.assert_allclose(out, values, rtol=1e-7)
    np.testing.assert_array_equal(validate_array(values), out)
    np.testing.assert_array_equal(validate_array(tuple(tuple(r) for r in values.tolist())), out)


def test_good_array_of_ints_and_floats_is_read_as_the_slow_path_reads_it() -> None:
    values = np.random.default_rng(1).random((28, 28)).tolist()
    values[0][:4] = [0, 1, 5e-324, 1 - 2**-53]  # ints, a denormal, a double float32 rounds up to 1
    fast = validate_array(values)  # lists of numbers: the vectorised check
    slow = validate_array([tuple(row) for row in values])  # tuples: the loop, pixel by pixel
    assert fast.dtype == np.float32 and fast.tobytes() == slow.tobytes()
    assert fast[0, :4].tolist() == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("fmt", "size", "options"),
    [("PNG", (28, 28), {}), ("PNG", (227, 224), {}), ("JPEG", (28, 28), {}), ("JPEG", (4000, 3000), {}),
     ("JPEG", (300, 200), {"progressive": True, "icc_profile": b"\0" * 5000}), ("GIF", (64, 65), {}),
     ("BMP", (31, 7), {}), ("TIFF", (28, 28), {}), ("WEBP", (28, 28), {})],
)  # fmt: skip
def test_header_pixels_reads_the_size_a_header_announces(fmt: str, size: tuple[int, int], options) -> None:
    buf = io.BytesIO()
    Image.new("L", size, 200).save(buf, format=fmt, **options)
    data = buf.getvalue()
    want = None if fmt in ("TIFF", "WEBP") else size[0] * size[1]
    assert header_pixels(data) == want
    if want is not None:  # what decoding finds
        assert decode_image(data, max_pixels=10**8).size == size


CUT_HEADERS = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0\x00",
    b"\xff\xd8" + b"\xff\xe1\xff\xff" * 3,
    b"GIF8",
    b"BM",
]


@pytest.mark.parametrize("data", CUT_HEADERS)
def test_header_pixels_of_a_cut_or_odd_header_is_none(data: bytes) -> None:
    assert header_pixels(data) is None


# ------------------------------------------------------------------------ the steps OpenCV now runs


@pytest.mark.parametrize("n", [1, 2, 784, 4096, 4097, 50_000, 196_608])
def test_quantiles_are_numpys_nearest_order_statistics(n: int) -> None:
    from capsnet.service.preprocess import _quantiles

    rng = np.random.default_rng(n)
    qs = (0.0, 0.005, 0.05, 0.5, 0.95, 0.995, 1.0)
    cases = {
        "uniform": rng.random(n, dtype=np.float32),
        "heavy-tailed": rng.standard_cauchy(n).astype(np.float32),
        "ties": np.round(rng.normal(0.8, 0.05, n) * 255).astype(np.float32) / 255,  # 8-bit grey levels
        "flat-paper": np.where(rng.random(n) < 0.97, np.float32(0.9), rng.random(n, dtype=np.float32)),
        "constant": np.full(n, 0.25, dtype=np.float32),
    }
    for name, values in cases.items():
        expected = np.quantile(values, qs, method="nearest")
        assert _quantiles(values.reshape(1, -1), qs) == expected.tolist(), name  # exact: values that occur


@pytest.mark.parametrize(("dtype", "full"), [(np.uint8, 255.0), (np.uint16, 65535.0)])
def test_level_quantiles_are_those_of_the_grey_image(dtype: type, full: float) -> None:
    # The polarity rule reads its order statistics from a histogram of the integer levels (from a sort
    # of them, up to 4,096): they must be, bit for bit, those of the float32 grey image they become.
    from capsnet.service.preprocess import _level_quantiles, _quantiles, _to_float

    rng = np.random.default_rng(17)
    qs = (0.0, 0.005, 0.5, 0.995, 1.0)
    top = int(full)
    for levels in (
        rng.integers(0, top + 1, size=(224, 227)).astype(dtype),
        np.round(rng.normal(0.8, 0.05, (300, 200)).clip(0, 1) * top).astype(dtype),  # paper and ties
        np.full((31, 17), top // 3, dtype=dtype),
        rng.integers(0, top + 1, size=(28, 28)).astype(dtype),  # a digit's size: sorted
        rng.integers(0, top + 1, size=(64, 65)).astype(dtype),  # just over 4,096: the histogram
    ):
        assert _level_quantiles(levels, qs, full) == _quantiles(_to_float(levels, full), qs)


AREA_CASES = [((224, 227), 96), ((224, 227), 48), ((301, 200), 96), ((97, 95), 48)]


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
@pytest.mark.parametrize(("shape", "side"), AREA_CASES)
def test_area_reduction_averages_what_lies_under_each_target_pixel(
    dtype: type, shape: tuple[int, int], side: int
) -> None:
    # _area halves a large image before OpenCV's general area resize: a uniform paper must stay
    # uniform (to the bit in 8-bit levels), and a ramp must come out as its value at each target
    # pixel's centre, as a mean over the pixel's own stretch of the source gives it, within about a
    # source pixel (an odd side gets its edge repeated, so the grid spans one pixel more) and the
    # rounding of 8-bit levels.
    import cv2

    from capsnet.service.preprocess import _area

    h, w = shape
    scale = side / max(h, w)
    flat = np.full(shape, 200, dtype=dtype) if dtype == np.uint8 else np.full(shape, 0.7, dtype=dtype)
    out = _area(flat, scale)
    assert out.dtype == dtype and out.shape == (max(1, round(h * scale)), max(1, round(w * scale)))
    if dtype == np.uint8:  # integer levels: to the bit, as `_levels` relies on
        np.testing.assert_array_equal(out, flat[: out.shape[0], : out.shape[1]])
    else:  # float sums: within the last place
        np.testing.assert_allclose(out, 0.7, rtol=0, atol=1e-6)
    full = 255.0 if dtype == np.uint8 else 1.0
    for axis in (0, 1):
        n = shape[axis]
        ramp = (np.arange(n) + 0.5) / n  # the value at each source pixel's centre, in (0, 1)
        src = np.broadcast_to(ramp[:, None] if axis == 0 else ramp[None, :], shape)
        levels = np.round(src * full).astype(dtype) if dtype == np.uint8 else src.astype(dtype)
        levels = np.ascontiguousarray(levels)
        got = _area(levels, scale).astype(np.float64) / full
        m = got.shape[axis]
        centres = (np.arange(m) + 0.5) / m
        expected = centres[:, None] if axis == 0 else centres[None, :]
        rounding = 1.5 / 255 if dtype == np.uint8 else 1e-6  # the source's levels, then two resizes
        assert np.abs(got - expected).max() <= 1.25 / n + rounding, axis
        one_step = cv2.resize(levels, got.shape[::-1], interpolation=cv2.INTER_AREA).astype(np.float64) / full
        assert np.abs(got - one_step).max() <= 1.25 / n + rounding + 1 / 255, axis  # its own rounding too


def test_paper_statistics_of_every_other_pixel_are_those_of_all() -> None:
    # The median and the MAD of a large image come from a quarter of its pixels: on a noisy paper they
    # must stay within 3 % of the noise's deviation of those of every pixel (their standard error on
    # 12,712 pixels is 1.1 %), and a flat paper must keep a deviation of exactly 0.
    from capsnet.service.preprocess import _quantiles, _statistics_sample

    rng = np.random.default_rng(5)
    sigma = 0.02
    paper = (0.01 + sigma * rng.standard_normal((224, 227))).astype(np.float32)
    sample = _statistics_sample(paper)
    assert sample.shape == (112, 114)
    for values in (paper, paper + np.float32(0.3) * (rng.random(paper.shape) < 0.1)):  # 10 % ink
        (level_all,) = _quantiles(values, (0.5,))
        (level,) = _quantiles(_statistics_sample(values), (0.5,))
        (mad_all,) = _quantiles(np.abs(values - np.float32(level_all)), (0.5,))
        (mad,) = _quantiles(np.abs(_statistics_sample(values) - np.float32(level)), (0.5,))
        assert abs(level - level_all) < 0.03 * sigma and abs(1.4826 * (mad - mad_all)) < 0.03 * sigma
    flat = np.full((224, 227), 0.9, dtype=np.float32)
    flat[::2, 1::2] = 0.2  # ink on the pixels the sample leaves out: every pixel it reads is paper
    (level,) = _quantiles(_statistics_sample(flat), (0.5,))
    assert level == np.float32(0.9) and _quantiles(np.abs(_statistics_sample(flat) - level), (0.5,)) == [0.0]
    small = rng.random((100, 150), dtype=np.float32)  # 15,000 pixels: all of them are read
    assert _statistics_sample(small) is small


def test_background_is_the_lighting_under_the_strokes() -> None:
    from capsnet.service.preprocess import _background

    h, w = 240, 320
    yy, xx = np.mgrid[0:h, 0:w]
    y, x = (yy + 0.5) / h * 2 - 1, (xx + 0.5) / w * 2 - 1
    lighting = (0.3 + 0.1 * x - 0.05 * y + 0.08 * x * x - 0.04 * x * y + 0.06 * y * y).astype(np.float32)
    ink = lighting.copy()
    ink[60:200, 100:118] += 0.6  # strokes 18 pixels wide: under 4 pixels on the 48-pixel copy
    ink[120:138, 60:260] += 0.6
    background = _background(ink)
    assert background.shape == (h, w) and background.dtype == np.float32
    assert np.abs(background - lighting).max() < 0.02  # the strokes are not part of the background
    assert np.abs(_background(lighting) - lighting).max() < 1e-3  # a quadratic surface is fitted exactly


def test_specks_go_and_strokes_stay_whatever_their_direction() -> None:
    from capsnet.service.preprocess import _drop_specks

    ink = np.zeros((90, 90), dtype=np.float32)
    ink[10:30, 10:30] = 1.0  # the digit's main stroke: mass 400 (with its edges, 412)
    ink[9, 10:30] = ink[30, 10:30] = 0.3  # its soft edges, above the level the blobs are found at
    ink[8, 10:30] = 0.04  # ... and fainter, under it: kept within 2 pixels of a kept blob
    ink[60, 5] = 0.04  # faint ink far from any blob
    diagonal = np.arange(45, 85)
    ink[diagonal, diagonal] = 1.0  # 40 pixels joined only at their corners (8-connected)
    ink[5:8, 70:73] = 1.0  # a speck: mass 9, under 5 % of the largest blob (20.6)
    out = _drop_specks(ink.copy())
    assert out[5:8, 70:73].max() == 0.0 and out[60, 5] == 0.0
    np.testing.assert_array_equal(out[diagonal, diagonal], 1.0)  # one blob, not 40 specks of mass 1
    np.testing.assert_array_equal(out[:45, :45], ink[:45, :45])  # the stroke, soft edges and all


def _phone_jpeg(height: int, width: int, seed: int = 0) -> bytes:
    digit = load_split("mnist", "test")[0][seed]
    return render_photo(
        digit, np.random.default_rng(seed), canvas=(height, width), scale=width / 80, noise=0.01
    )


def test_large_jpeg_is_decoded_at_reduced_scale(monkeypatch) -> None:
    from PIL import JpegImagePlugin

    data = encode(Image.open(io.BytesIO(_phone_jpeg(1600, 2200))).convert("RGB"), "JPEG", quality=80)
    decoded_at = []
    load = JpegImagePlugin.JpegImageFile.load

    def spy(self: JpegImagePlugin.JpegImageFile) -> object:
        decoded_at.append((self.size, self.mode))
        return load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    small = decode_image(data, max_pixels=MAX_PIXELS, work_side=512)
    # 1/4: the smallest of libjpeg's scales that keeps the long side at 384 (3/4 of 512) or more (1/8: 275).
    assert small.size == (550, 400) and small.mode == "L"
    assert decoded_at[0] == ((550, 400), "L")  # the full-size pixels never existed
    decoded_at.clear()
    assert decode_image(data, max_pixels=MAX_PIXELS).size == (2200, 1600)  # without work_side: as today
    assert decoded_at[0] == ((2200, 1600), "RGB")

    # Where even 1/2 would leave under 384 pixels a JPEG decodes at full size and in its own mode.
    medium = encode(Image.open(io.BytesIO(data)).resize((767, 558)), "JPEG", quality=80)
    assert decode_image(medium, max_pixels=MAX_PIXELS, work_side=512).size == (767, 558)
    assert decode_image(medium, max_pixels=MAX_PIXELS, work_side=512).mode == "RGB"
    assert decode_image(
        encode(Image.open(io.BytesIO(medium)).resize((768, 558)), "JPEG"),
        max_pixels=MAX_PIXELS,
        work_side=512,
    ).size == (384, 279)
    # The header check still comes first: a bomb is refused before any scale is chosen.
    with pytest.raises(PreprocessError) as err:
        decode_image(with_jpeg_size(data, 60_000, 60_000), max_pixels=MAX_PIXELS, work_side=512)
    assert err.value.status_code == 413


def test_large_jpeg_at_reduced_scale_gives_the_digit_a_full_decode_gives() -> None:
    data = _phone_jpeg(1600, 2200, seed=3)
    full = to_mnist(decode_image(data, max_pixels=MAX_PIXELS))  # every pixel decoded, then averaged
    reduced = preprocess_bytes(data, mode="mnist", max_pixels=MAX_PIXELS)
    assert aligned_correlation(reduced, full) > 0.99
    assert np.abs(reduced - full).mean() < 0.02


@pytest.mark.parametrize("index", range(4))
def test_the_brightest_pixel_is_white_as_in_mnist(mnist: tuple[np.ndarray, np.ndarray], index: int) -> None:
    """The 20x20 fit averages the area under each pixel (Pillow's Lanczos before overshot and was
    clipped at 1); averaging dims stroke cores by a few per cent, so the fit is scaled to reach 1."""
    images, _ = mnist
    photo = render_photo(images[index], np.random.default_rng(index), scale=7.0)
    out = preprocess_bytes(photo, mode="mnist", max_pixels=MAX_PIXELS)
    assert out.max() == 1.0
    assert (images[index] == 255).any()  # MNIST's own digit has a pixel at full white too


def test_preprocess_none_refuses_a_wrong_size_from_the_header_without_decoding(monkeypatch) -> None:
    from PIL import ImageFile

    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")  # ~9 MB of pixels in a few KB
    assert len(buf.getvalue()) < 64 * 1024

    def no_decoding(self: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(PreprocessError) as info:
        preprocess_bytes(buf.getvalue(), mode="none", max_pixels=MAX_PIXELS * 4)
    assert info.value.status_code == 422
    assert "needs a 28x28 image, got 3000x3000" in info.value.detail
