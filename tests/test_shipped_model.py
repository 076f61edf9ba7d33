"""The model that ships under models/capsnet-mnist, checked through onnxruntime like users run it."""

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model_export.card import evaluate_onnx
from model_export.data import load_split
from service.settings import SHIPPED_MODEL, Settings
from tests.live import ready_client

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in {".png", ".jpg"})
# Issue 5 asks for >= 99.5 % through onnxruntime: the shipped model must never fall below it, and the
# card's own figure is checked exactly below.
ACCURACY_FLOOR = 0.995
# Issue 21: the int8 variant may lose at most 0.1 point against fp32 on the same 10,000 test images.
INT8_MAX_DROP = 0.001


def test_shipped_artifacts_are_complete_and_small():
    names = {p.name for p in SHIPPED_MODEL.iterdir()}
    assert {"capsnet.onnx", "capsnet-int8.onnx", "decoder.onnx", "model_card.json", "MODEL_CARD.md"} <= names
    assert not any(n.endswith((".pt", ".pth", ".ckpt")) for n in names)  # no checkpoints, no optimizer state
    total = sum(p.stat().st_size for p in SHIPPED_MODEL.iterdir())
    assert total < 45 * 2**20


@pytest.mark.slow
def test_shipped_model_accuracy_through_onnxruntime_matches_its_card():
    card = json.loads((SHIPPED_MODEL / "model_card.json").read_text())
    x, y = load_split("mnist", "test")
    preds = evaluate_onnx(SHIPPED_MODEL / "capsnet.onnx", x)
    accuracy = float((preds == y).mean())
    assert accuracy == pytest.approx(card["evaluation"]["test_accuracy"], abs=1e-9)
    assert int((preds != y).sum()) == card["evaluation"]["errors"]
    assert accuracy >= ACCURACY_FLOOR
    assert card["parameters"]["total"] == 8_215_568 and card["config"]["routing_iterations"] == 3
    assert f"{accuracy * 100:.2f} %" in (SHIPPED_MODEL / "MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_shipped_int8_model_accuracy_through_onnxruntime_matches_its_card():
    card = json.loads((SHIPPED_MODEL / "model_card.json").read_text())
    q = card["int8"]
    x, y = load_split("mnist", "test")
    preds = evaluate_onnx(SHIPPED_MODEL / "capsnet-int8.onnx", x)
    accuracy = float((preds == y).mean())
    assert accuracy == pytest.approx(q["test_accuracy"], abs=1e-9)
    assert int((preds != y).sum()) == q["errors"] and q["test_images"] == len(y) == 10_000
    # The fp32 figure the gate compared against is the card's own evaluation of capsnet.onnx.
    assert q["fp32_test_accuracy"] == pytest.approx(card["evaluation"]["test_accuracy"], abs=1e-9)
    assert accuracy >= q["fp32_test_accuracy"] - INT8_MAX_DROP
    assert q["calibration"]["split"] == "train"
    md = (SHIPPED_MODEL / "MODEL_CARD.md").read_text()
    assert f"**{accuracy * 100:.2f} %** int8" in md
    sess = ort.InferenceSession(str(SHIPPED_MODEL / "capsnet-int8.onnx"), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["precision"] == "int8" and meta["version"] == card["version"]


def test_readme_examples_exist_and_are_classified_correctly():
    assert {p.stem for p in EXAMPLES} == {str(d) for d in range(10)}
    readme = (ROOT / "README.md").read_text()
    for ref in set(re.findall(r"examples/\w+\.(?:png|jpg)", readme)):
        assert (ROOT / ref).is_file(), ref
    with ready_client(Settings(model_dir=SHIPPED_MODEL)) as client:
        files = [
            ("files", (p.name, p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg"))
            for p in EXAMPLES
        ]
        r = client.post("/predict", files=files)
        assert r.status_code == 200, r.text
        got = [item["label"] for item in r.json()["predictions"]]
        assert got == [p.stem for p in EXAMPLES]
        probs = np.array([item["probability"] for item in r.json()["predictions"]])
        assert probs.min() > 0.5  # confidently right, not by a hair
