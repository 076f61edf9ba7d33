"""The package as users meet it: the wheel carries the shipped model and the web page, and
`capsnet predict` classifies files and folders offline and through a running service.

The whole path from a wheel in a fresh virtualenv (`capsnet serve` from /tmp, one /predict) is
scripts/check-wheel.sh, which .ci/run runs after the tests.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capsnet.cli import main
from capsnet.model_export.data import DATASETS, load_split
from capsnet.predict import Progress
from capsnet.service.settings import SHIPPED_MODEL, Settings, shipped_models
from tests import live
from tests.service.photos import render_product

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in {".png", ".jpg"})
SHIPPED_FILES = (
    "capsnet.onnx",
    "capsnet-int8.onnx",
    "decoder.onnx",
    "model_card.json",
    "MODEL_CARD.md",
    "export.json",
)
CORRUPT = "The PNG image is corrupt or truncated."


def predict(*argv: str) -> int:
    """`capsnet predict ...` in this process; its exit status."""
    with pytest.raises(SystemExit) as exit_:
        main(["--log-level", "WARNING", "predict", *argv])
    code = exit_.value.code
    assert isinstance(code, int), code  # a message instead of a status is a failed run
    return code


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def digit(file: str) -> int:
    return int(Path(file).name[0])  # examples/7.png, .../3_corrupt.png ...


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of the 13 example scans in two subfolders, a truncated PNG sorted into the middle,
    and a text file that is no image (skipped)."""
    root = tmp_path_factory.mktemp("scans")
    for k, p in enumerate(EXAMPLES):
        sub = root / ("a" if k % 2 else "b")
        sub.mkdir(exist_ok=True)
        shutil.copy(p, sub / p.name)
    (root / "a" / "4_corrupt.png").write_bytes((ROOT / "examples" / "4.png").read_bytes()[:3000])
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def test_settings_default_to_the_shipped_model_and_the_environment_overrides_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert SHIPPED_MODEL.name == "capsnet-mnist" and isinstance(SHIPPED_MODEL, Path)
    assert all((SHIPPED_MODEL / name).is_file() for name in SHIPPED_FILES)
    monkeypatch.delenv("CAPSNET_MODEL_DIR", raising=False)
    assert Settings().model_dir == SHIPPED_MODEL
    monkeypatch.setenv("CAPSNET_MODEL_DIR", str(tmp_path))
    assert Settings().model_dir == tmp_path


def test_the_shipped_model_comes_from_the_installed_data_package_when_there_is_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from capsnet.service.settings import _shipped_model

    package = tmp_path / "capsnet" / "models"
    (package / "capsnet-mnist").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    # a `capsnet` of its own whose `models` is found, as in a wheel; the real one back afterwards
    (package.parent / "__init__.py").write_text("")
    names = ("capsnet", "capsnet.models")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert _shipped_model() == package / "capsnet-mnist"
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    # Nothing installed (a checkout on sys.path, an editable install made before this package existed):
    # the checkout's own models/.
    if importlib.util.find_spec("capsnet.models") is None:
        assert _shipped_model() == ROOT / "models" / "capsnet-mnist"


def test_predict_gives_every_example_its_digit_as_csv(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    assert predict(str(ROOT / "examples"), "--output", str(out)) == 0
    rows = read_csv(out)
    assert [Path(r["file"]).name for r in rows] == [p.name for p in EXAMPLES]  # sorted, .py skipped
    for r in rows:
        lengths = [float(r[f"probability_{d}"]) for d in range(10)]
        assert int(r["class_index"]) == int(r["label"]) == digit(r["file"]), r
        assert float(r["probability"]) == max(lengths) > 0.8 and r["error"] == ""
        assert sorted(lengths)[-2] < 0.2  # capsule lengths: one long, the others short


def test_predict_walks_a_folder_and_goes_on_after_a_corrupt_file(
    scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert predict(str(scans), "--batch-size", "5") == 1  # one file failed (4th of batch 1)
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines]
    files = sorted(p for p in scans.rglob("*.png")) + sorted(scans.rglob("*.jpg"))
    assert sorted(r["file"] for r in rows) == sorted(map(str, files))  # notes.txt left out, 14 rows
    assert [r["file"] for r in rows] == sorted(r["file"] for r in rows)  # in path order
    bad = [r for r in rows if "error" in r]
    assert bad == [{"file": str(scans / "a" / "4_corrupt.png"), "error": CORRUPT}]
    good = [r for r in rows if "error" not in r]
    assert len(good) == 13 and rows.index(bad[0]) not in (0, len(rows) - 1)  # failed in the middle
    for r in good:
        assert r["class_index"] == digit(r["file"]) and r["label"] == str(digit(r["file"]))
        assert len(r["probabilities"]) == 10 and r["probability"] == max(r["probabilities"]) > 0.8

    # The same rows as a table, decoded by two threads ahead of inference: identical classes and lengths.
    out = tmp_path / "out.csv"
    assert predict(str(scans), "--output", str(out), "--decode-threads", "2", "--batch-size", "3") == 1
    table = read_csv(out)
    assert [t["file"] for t in table] == [r["file"] for r in rows]
    for t, r in zip(table, rows, strict=True):
        if "error" in r:
            assert t["error"] == CORRUPT and t["class_index"] == ""
        else:
            assert int(t["class_index"]) == r["class_index"]
            lengths = [float(t[f"probability_{d}"]) for d in range(10)]
            np.testing.assert_allclose(lengths, r["probabilities"], atol=1e-6)


def test_predict_preprocess_none_on_mnist_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = load_split("mnist", "test")
    for i in range(32):
        Image.fromarray(x[i]).save(tmp_path / f"{i:02d}.png")
    shutil.copy(ROOT / "examples" / "7.png", tmp_path / "99-scan.png")  # not 28x28: refused, not guessed
    assert predict(str(tmp_path), "--preprocess", "none", "--batch-size", "5") == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.get("class_index") for r in rows[:32]] == [int(v) for v in y[:32]]
    assert rows[32]["error"].startswith("preprocess=none needs a 28x28 image, got ")


def test_predict_through_a_running_service_gives_the_same_rows(
    scans: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert predict(str(scans)) == 1
    offline = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with live.serve(Settings(model_dir=SHIPPED_MODEL, max_batch_size=8)) as host_port:
        assert predict(str(scans), "--url", f"http://{host_port}", "--concurrency", "4") == 1
    remote = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in remote] == [r["file"] for r in offline]
    for r, o in zip(remote, offline, strict=True):
        if "error" in o:
            assert r["error"] == f"HTTP 400: {CORRUPT}"
        else:
            assert r["class_index"] == o["class_index"] == digit(r["file"]) and r["label"] == o["label"]
            np.testing.assert_allclose(r["probabilities"], o["probabilities"], atol=1e-5)


def test_predict_preprocesses_as_the_models_metadata_says_offline_and_through_the_service(
    tiny_fashion_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for seed in range(3):
        (tmp_path / f"product-{seed}.png").write_bytes(render_product(np.random.default_rng(seed)))

    def rows(*argv: str) -> list[dict[str, object]]:
        assert predict(str(tmp_path), *argv) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    fashion = ("--model-dir", str(tiny_fashion_model_dir))
    default = rows(*fashion)
    assert rows(*fashion, "--preprocess", "fashion") == default  # the model's own: `fashion`
    as_digits = rows(*fashion, "--preprocess", "mnist")
    assert [r["probabilities"] for r in as_digits] != [r["probabilities"] for r in default]
    clothes = list(DATASETS["fashion-mnist"].labels)
    assert all(r["label"] == clothes[r["class_index"]] for r in default)  # type: ignore[index]
    settings = Settings(model_dir=SHIPPED_MODEL, model_dirs=str(tiny_fashion_model_dir), max_batch_size=8)
    with live.serve(settings) as host_port:
        remote = rows("--url", f"http://{host_port}", "--model", "tiny-fashion")
    assert [(r["file"], r["label"]) for r in remote] == [(r["file"], r["label"]) for r in default]
    for r, o in zip(remote, default, strict=True):
        np.testing.assert_allclose(r["probabilities"], o["probabilities"], atol=1e-5)  # type: ignore[arg-type]


def test_predict_fails_with_one_line_when_it_cannot_start(tmp_path: Path) -> None:
    image = str(ROOT / "examples" / "7.png")
    cases = {
        ("--model-dir", str(tmp_path)): f"capsnet predict: model file not found: {tmp_path / 'capsnet.onnx'}",
        ("--output", str(tmp_path / "out.txt")): f"capsnet predict: --output {tmp_path / 'out.txt'}: use a",
        ("--url", "http://127.0.0.1:9"): "capsnet predict: cannot reach the service at http://127.0.0.1:9: ",
        ("--batch-size", "0"): "capsnet predict: --batch-size must be at least 1",
        ("--model", "tiny"): "capsnet predict: --model names a model of the service at --url; offline, use",
        (
            "--output",
            str(tmp_path / "no" / "o.csv"),
        ): f"capsnet predict: --output {tmp_path / 'no' / 'o.csv'}: No such",
    }
    for args, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            main(["predict", image, *args])
        assert str(exit_.value.code).startswith(message), (args, exit_.value.code)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(tmp_path)])  # an empty folder
    message = str(exit_.value.code)
    assert message.startswith("capsnet predict: no image files (.bmp, .gif, ") and str(tmp_path) in message


def test_a_missing_file_is_an_error_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert predict(str(ROOT / "examples" / "3.png"), str(tmp_path / "nope.png")) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["class_index"] == 3
    assert rows[1] == {
        "file": str(tmp_path / "nope.png"),
        "error": "cannot read the file: No such file or directory",
    }


def test_progress_bar_counts_and_rate() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = Progress(20, stream, bar=True)
    for k in range(20):
        progress.update(failed=k == 7)
    progress.close()
    text = stream.getvalue()
    bar, summary = text.rsplit("\n", 2)[-3:-1]
    assert bar.split("\r")[-1].startswith("[" + "#" * 30 + "] 20/20 files, 1 failed, ")
    assert summary.startswith("capsnet predict: 20 files, 19 classified, 1 failed, in ")
    quiet = io.StringIO()
    Progress(3, quiet, bar=False).close()
    assert "\r" not in quiet.getvalue() and quiet.getvalue().startswith("capsnet predict: 0 files")


def _build(source: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "build", *args, "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_sdist_and_wheel_carry_the_model_and_the_web_page_and_pass_twine(tmp_path: Path) -> None:
    _build(ROOT, tmp_path)  # the sdist, then the wheel built from the sdist (as pip does from PyPI)
    (wheel,) = tmp_path.glob("*.whl")
    (sdist,) = tmp_path.glob("*.tar.gz")
    check = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    with zipfile.ZipFile(wheel) as z:
        sizes = {i.filename: i.file_size for i in z.infolist()}
        meta = Parser().parsestr(z.read(next(n for n in sizes if n.endswith(".dist-info/METADATA"))).decode())
        entry_points = z.read(next(n for n in sizes if n.endswith(".dist-info/entry_points.txt"))).decode()
    # every shipped model (the default one with all its files), byte for byte the size of the repository's
    shipped = {d.name: [n for n in SHIPPED_FILES if (d / n).is_file()] for d in shipped_models()}
    assert shipped["capsnet-mnist"] == list(SHIPPED_FILES)
    for folder, files in shipped.items():
        assert "capsnet.onnx" in files
        for name in files:
            assert (
                sizes[f"capsnet/models/{folder}/{name}"] == (ROOT / "models" / folder / name).stat().st_size
            )
    for p in (ROOT / "capsnet" / "service" / "static").iterdir():
        assert sizes[f"capsnet/service/static/{p.name}"] == p.stat().st_size
    for p in (ROOT / "capsnet").rglob("*.py"):
        assert p.relative_to(ROOT).as_posix() in sizes, p
    # one top-level name: nothing for pip to overwrite in another project's `service` or `bench`
    assert {n.split("/")[0] for n in sizes if not n.startswith("capsnet_service-")} == {"capsnet"}
    assert not [
        n for n in sizes if n.startswith(("tests/", "examples/", "models/")) or n.endswith("-fp16.onnx")
    ]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in sizes)
    assert meta["Name"] == "capsnet-service" and meta["License-Expression"] == "MIT"
    assert "Framework :: FastAPI" in meta.get_all("Classifier")
    assert meta["Description-Content-Type"] == "text/markdown" and "capsnet predict" in meta.get_payload()
    assert "capsnet = capsnet.cli:main" in entry_points
    model_mb = (
        sum((ROOT / "models" / d / n).stat().st_size for d, files in shipped.items() for n in files) / 2**20
    )
    assert wheel.stat().st_size / 2**20 < model_mb + 2  # the models (they barely compress) and little else

    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"setup.py", "LICENSE", "models/__init__.py"} <= names
    assert {f"models/{d}/{n}" for d, files in shipped.items() for n in files} <= names


@pytest.mark.slow
def test_a_tree_without_models_builds_a_wheel_without_the_model_and_says_so(tmp_path: Path) -> None:
    """The container's build stage: the code only, the model copied beside the venv (one copy)."""
    src = tmp_path / "src"
    shutil.copytree(  # what docker/Dockerfile copies: capsnet/ without the training side
        ROOT / "capsnet", src / "capsnet", ignore=shutil.ignore_patterns("__pycache__", "model_export")
    )
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    result = _build(src, tmp_path / "dist", "--wheel")
    assert "models/ is absent: this wheel carries no model" in result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "capsnet/service/static/index.html" in names and "capsnet/predict.py" in names
    assert not [n for n in names if n.startswith(("capsnet/models/", "capsnet/model_export/"))]
    assert wheel.stat().st_size < 1 * 2**20
