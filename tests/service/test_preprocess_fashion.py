"""capsnet.service.preprocess's Fashion-MNIST procedure (`preprocess=fashion`) on product photos: the
product bright on black, its longest side 28, centred, in 8-bit levels, as Zalando made Fashion-MNIST;
and the bad inputs refused as in every mode."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from capsnet.model_export.data import load_split
from capsnet.service.preprocess import PreprocessError, preprocess_bytes
from tests.service.photos import render_product
from tests.service.test_preprocess import BAD_IMAGES, MAX_PIXELS, encode


def fashion(data: bytes) -> np.ndarray:
    return preprocess_bytes(data, mode="fashion", max_pixels=MAX_PIXELS)


def png(a: np.ndarray) -> bytes:
    return encode(Image.fromarray(a), "PNG")


def levels(x: np.ndarray) -> np.ndarray:
    """The (28, 28) float32 answer as the 8-bit levels it holds (it holds nothing between them)."""
    assert x.shape == (28, 28) and x.dtype == np.float32
    scaled = x.astype(np.float64) * 255
    np.testing.assert_allclose(scaled, np.rint(scaled), atol=1e-4)
    return np.rint(scaled).astype(int)


def extent(a: np.ndarray, level: int = 0) -> tuple[int, int, int, int]:
    """First and last row, first and last column above `level`."""
    rows, cols = np.flatnonzero((a > level).any(axis=1)), np.flatnonzero((a > level).any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def test_a_plain_product_comes_out_as_worked_out_by_hand() -> None:
    # a 280x140 product of grey 50 on a 400x300 background of 250, off-centre with unequal margins
    photo = np.full((400, 300), 250, np.uint8)
    photo[30:310, 100:240] = 50
    # trimmed to 280x140, resized to 28x14, extended to 28x28 by 7 columns each side, negated against
    # the background: (250 - 50) / 250 = 0.8 -> level 204, the background -> 0
    want = np.zeros((28, 28), int)
    want[:, 7:21] = 204
    np.testing.assert_array_equal(levels(fashion(png(photo))), want)
    # the same product bright on a dark background is already in form: it is not negated
    np.testing.assert_array_equal(levels(fashion(png(255 - photo))), want)


def test_on_white_it_is_zalandos_negation_and_an_odd_margin_goes_left() -> None:
    rng = np.random.default_rng(0)
    product = rng.integers(0, 200, (28, 19)).astype(np.uint8)  # every pixel far from white
    photo = np.full((50, 40), 255, np.uint8)
    photo[9:37, 13:32] = product
    want = np.zeros((28, 28), int)
    want[:, 5:24] = 255 - product  # 28 - 19 = 9 columns of margin: 5 left, 4 right
    np.testing.assert_array_equal(levels(fashion(png(photo))), want)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_product_photo_is_bright_on_black_longest_side_28_centred(fmt: str) -> None:
    # trousers 320 high and 160 wide on a light, noisy background of 236; 28 x 14 after resizing
    data = render_product(np.random.default_rng(1), fmt=fmt)
    out = levels(fashion(data))
    slack = 0 if fmt == "PNG" else 1  # JPEG's ringing may widen the trimmed box by a few photo pixels
    top, bottom, left, right = extent(out, level=25)
    assert (top, bottom) == (0, 27), "the longest side spans the field"
    assert abs((right - left + 1) - 14) <= slack and abs(left - (27 - right)) <= 1, "centred"
    background = np.ones_like(out, bool)
    background[:, left : right + 1] = False
    assert out[background].max() <= 3 * slack, "the background is black"
    leg = out[10:, left + 1 : left + 4]  # the legs: (236 - 60) / 236 -> level 190
    assert abs(np.median(leg) - 190) <= 2 + 2 * slack
    assert out[1, left + 2 : right - 1].min() > np.median(leg) + 20, "the darker waistband is brighter"
    gap = out[12:, 13:15]  # between the legs: background again
    assert gap.max() < 100 and gap.mean() < np.median(leg) / 3


def test_a_large_colour_jpeg_is_brought_to_form_too() -> None:
    photo = np.full((2000, 1600, 3), (244, 240, 232), np.uint8)  # off-white
    photo[250:1750, 450:1150] = (170, 20, 30)  # a red dress, 1500 x 700
    out = levels(fashion(encode(Image.fromarray(photo), "JPEG", quality=90)))
    top, bottom, left, right = extent(out, level=40)
    width = round(700 / 1500 * 28)  # 13
    assert (top, bottom) == (0, 27) and abs((right - left + 1) - width) <= 1
    assert abs(left - (27 - right)) <= 1
    inside = out[2:-2, left + 1 : right]
    # red (170, 20, 30) is grey 66 in Pillow's luma, the background 240: (240 - 66) / 240 -> level 185
    assert abs(np.median(inside) - 185) <= 4
    assert out[:, : left - 1].max() <= 8 and out[:, right + 2 :].max() <= 8


def test_a_transparent_background_counts_as_white() -> None:
    cutout = np.zeros((60, 90, 4), np.uint8)  # transparent black around the product
    cutout[5:55, 20:40] = (80, 80, 80, 255)
    on_white = np.full((60, 90), 255, np.uint8)
    on_white[5:55, 20:40] = 80
    got = fashion(encode(Image.fromarray(cutout, "RGBA"), "PNG"))
    np.testing.assert_array_equal(got, fashion(png(on_white)))
    assert levels(got).max() == 175  # 255 - 80


def test_a_product_in_a_corner_does_not_fool_the_background() -> None:
    photo = np.full((300, 200), 230, np.uint8)
    photo[:150, :100] = 40  # covers the top-left corner: the median of the four corners is still 230
    out = levels(fashion(png(photo)))
    assert extent(out) == (0, 27, 5, 23)  # 150 x 100 trimmed and resized to 28 x 19
    assert out[:, 5:24].min() == out.max() == round((230 - 40) / 230 * 255)
    assert out[:, :5].max() == out[:, 24:].max() == 0


def test_a_drawing_on_the_web_pages_black_pad_stays_bright() -> None:
    pad = np.zeros((280, 280), np.uint8)
    pad[40:240, 120:160] = 255  # a white stroke, 200 x 40
    out = levels(fashion(png(pad)))
    assert extent(out) == (0, 27, 11, 16) and out[:, 11:17].min() == 255  # 28 x 6 (5.6), centred
    assert out[:, :11].max() == out[:, 17:].max() == 0


def test_fashion_mnist_images_themselves_mostly_come_back_as_they_are() -> None:
    """Zalando's procedure made these; run again on one it changes nothing, except where the trim drops
    faint edge pixels (under 5 %) or Fashion-MNIST centred an odd margin the other way."""
    x, _ = load_split("fashion-mnist", "test")
    same = 0
    correlations = []
    for image in x[:300]:
        out = levels(fashion(png(image)))
        same += int(np.array_equal(out, image))
        correlations.append(np.corrcoef(out.ravel(), image.ravel())[0, 1])
    assert same >= 240, same  # 88 % of the first 1000 are equal to the level
    assert np.median(correlations) > 0.999


def test_a_blank_photo_has_no_product() -> None:
    photo = np.random.default_rng(2).normal(240, 2, (120, 90))
    with pytest.raises(PreprocessError) as err:
        fashion(png(np.clip(photo, 0, 255).astype(np.uint8)))
    assert err.value.status_code == 422 and "No object found" in err.value.detail


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_images_get_the_same_status_as_in_mnist_mode(name: str) -> None:
    data, status = BAD_IMAGES[name]
    with pytest.raises(PreprocessError) as err:
        fashion(data)
    assert err.value.status_code == status, err.value.detail


def test_unknown_mode_names_the_modes() -> None:
    with pytest.raises(PreprocessError) as err:
        preprocess_bytes(png(np.zeros((28, 28), np.uint8)), mode="fancy", max_pixels=MAX_PIXELS)  # type: ignore[arg-type]
    assert err.value.status_code == 422 and "'mnist', 'fashion' or 'none'" in err.value.detail


@pytest.mark.parametrize("size", [(1, 1), (1, 60), (60, 1), (2, 2)])
def test_tiny_images_do_not_crash(size: tuple[int, int]) -> None:
    with pytest.raises(PreprocessError) as err:  # all corners, or all alike: nothing differs from them
        fashion(png(np.full(size, 90, np.uint8)))
    assert err.value.status_code == 422
    bar = np.full((3, 60), 250, np.uint8)
    bar[1, 10:50] = 20  # a 1 x 40 line: 28 columns, one row
    out = levels(fashion(png(bar)))
    assert extent(out) == (14, 14, 0, 27)
