import gzip

import numpy as np
import pytest

from capsnet.model_export import data


def write_idx(path, array: np.ndarray, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", arr, compress)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x"), arr)


def test_read_idx_rejects_truncated_and_foreign(tmp_path):
    write_idx(tmp_path / "x", np.zeros((2, 3, 4), np.uint8))
    (tmp_path / "t").write_bytes((tmp_path / "x").read_bytes()[:-1])
    with pytest.raises(data.DataError, match="header promises"):
        data.read_idx(tmp_path / "t")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.read_idx(tmp_path / "png")


def test_bad_checksum_names_every_source(tmp_path, monkeypatch):
    spec = data.DatasetSpec(
        name="fake",
        labels=("a",),
        sha256={f: "0" * 64 for f in ("a-idx1-ubyte", "b-idx1-ubyte")},
        system_dirs=(str(tmp_path / "system"),),
        npm_package=None,
        mirrors=("http://127.0.0.1:9/",),
        preprocess="mnist",
    )
    monkeypatch.setitem(data.DATASETS, "fake", spec)
    user = tmp_path / "user"
    user.mkdir()
    for f in spec.sha256:
        write_idx(user / f, np.zeros(3, np.uint8))
    with pytest.raises(data.DataError) as exc:
        data.fetch("fake", data_dir=user, cache_dir=tmp_path / "cache")
    msg = str(exc.value)
    assert f"directory {user}: checksum mismatch" in msg
    assert "cache" in msg and "system package directory" in msg and "mirror http://127.0.0.1:9/" in msg
    assert not (tmp_path / "cache" / "fake").exists()  # nothing unverified is cached


def test_real_mnist_verified_and_loaded():
    x, y = data.load_split("mnist", "test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))
    assert np.bincount(y).tolist()[:3] == [980, 1135, 1032]  # the known MNIST test class counts
    xt, _ = data.load_split("mnist", "train")
    assert xt.shape == (60000, 28, 28)


def test_real_fashion_mnist_verified_and_loaded():
    x, y = data.load_split("fashion-mnist", "test")
    assert x.shape == (10000, 28, 28)
    assert np.bincount(y).tolist() == [1000] * 10


def test_random_shift_moves_content_by_at_most_two_pixels():
    rng = np.random.default_rng(0)
    img = np.zeros((500, 28, 28), np.uint8)
    img[:, 10:18, 10:18] = 255  # centred blob, never shifted off the edge
    shifted = data.random_shift(img, 2, rng)
    assert shifted.shape == img.shape
    assert (shifted.astype(int).sum((1, 2)) == img.astype(int).sum((1, 2))).all()
    rows = np.argmax(shifted.max(axis=2) > 0, axis=1) - 10
    cols = np.argmax(shifted.max(axis=1) > 0, axis=1) - 10
    assert set(rows.tolist()) == set(range(-2, 3)) and set(cols.tolist()) == set(range(-2, 3))
    assert data.random_shift(img, 0, rng) is img


def test_random_hflip_mirrors_about_half_the_images_and_nothing_else():
    rng = np.random.default_rng(0)
    img = np.zeros((1000, 28, 28), np.uint8)
    img[:, 5:20, 2:6] = 255  # a bar on the left: mirrored it lands on columns 22..25
    img[:, 0, 0] = np.arange(1000) % 251  # tags each image so a shuffle would show
    out = data.random_hflip(img, rng)
    mirrored = out[:, 10, 23] == 255
    assert 430 < mirrored.sum() < 570
    np.testing.assert_array_equal(out[mirrored], img[mirrored][:, :, ::-1])
    np.testing.assert_array_equal(out[~mirrored], img[~mirrored])


def test_dataset_checksum_is_stable():
    assert data.dataset_checksum("mnist") == data.dataset_checksum("mnist")
    assert data.dataset_checksum("mnist") != data.dataset_checksum("fashion-mnist")
