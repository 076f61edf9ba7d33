"""The model that ships under models/capsnet-mnist, checked through onnxruntime like users run it."""

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from capsnet.model_export.card import evaluate_onnx, onnx_probabilities
from capsnet.model_export.data import load_split
from capsnet.service.settings import SHIPPED_MODEL, Settings
from tests.live import ready_client

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in {".png", ".jpg"})
# Issue 5 asks for >= 99.5 % through onnxruntime: the shipped model must never fall below it, and the
# card's own figure is checked below to the tolerance the card states for another CPU.
ACCURACY_FLOOR = 0.995
# Issue 21: the int8 variant may lose at most 0.1 point against fp32 on the same 10,000 test images.
INT8_MAX_DROP = 0.001


def test_shipped_artifacts_are_complete_and_small():
    names = {p.name for p in SHIPPED_MODEL.iterdir()}
    assert {"capsnet.onnx", "capsnet-int8.onnx", "decoder.onnx", "model_card.json", "MODEL_CARD.md"} <= names
    assert not any(n.endswith((".pt", ".pth", ".ckpt")) for n in names)  # no checkpoints, no optimizer state
    total = sum(p.stat().st_size for p in SHIPPED_MODEL.iterdir())
    assert total < 45 * 2**20


def assert_matches_card(preds: np.ndarray, y: np.ndarray, figures: dict) -> None:
    """Errors as the card counts them, within the near ties it names: the images whose top two
    lengths are so close that another CPU's summation order can change their class."""
    errors = int((preds != y).sum())
    assert figures["near_ties"]["images"] <= 20, "a tolerance that wide says nothing"
    assert abs(errors - figures["errors"]) <= figures["near_ties"]["images"], (errors, figures)
    assert errors == round((1 - figures["test_accuracy"]) * len(y))  # the card's two figures agree


@pytest.mark.slow
def test_shipped_model_accuracy_through_onnxruntime_matches_its_card():
    card = json.loads((SHIPPED_MODEL / "model_card.json").read_text())
    ev = card["evaluation"]
    x, y = load_split("mnist", "test")
    preds = evaluate_onnx(SHIPPED_MODEL / "capsnet.onnx", x)
    assert_matches_card(preds, y, ev)
    assert float((preds == y).mean()) >= ACCURACY_FLOOR and ev["test_accuracy"] >= ACCURACY_FLOOR
    assert card["parameters"]["total"] == 8_215_568 and card["config"]["routing_iterations"] == 3
    md = (SHIPPED_MODEL / "MODEL_CARD.md").read_text()
    assert f"**{ev['test_accuracy'] * 100:.2f} %**" in md and ev["cpu"]["model"] in md
    assert f"{ev['near_ties']['images']} test image(s) whose top two lengths are within 0.0001" in md


@pytest.mark.slow
def test_shipped_int8_model_accuracy_through_onnxruntime_matches_its_card():
    card = json.loads((SHIPPED_MODEL / "model_card.json").read_text())
    q = card["int8"]
    x, y = load_split("mnist", "test")
    path = SHIPPED_MODEL / "capsnet-int8.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    int8 = onnx_probabilities(sess, x)
    assert_matches_card(int8.argmax(1), y, q)
    assert q["test_images"] == len(y) == 10_000
    # The fp32 figure the gate compared against is the card's own evaluation of capsnet.onnx.
    assert q["fp32_test_accuracy"] == pytest.approx(card["evaluation"]["test_accuracy"], abs=1e-9)
    assert q["test_accuracy"] >= q["fp32_test_accuracy"] - INT8_MAX_DROP
    assert q["calibration"]["split"] == "train"
    # Right on this CPU whatever its int8 kernels: as exact integer arithmetic computes it (graph
    # optimizations off: DequantizeLinear feeding fp32 Conv), within the tolerance the card states.
    assert q["weight_bits"] == 7 and q["max_gap_to_exact_integers"] <= q["exact_tolerance"] <= 0.01
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    exact = onnx_probabilities(
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), x[:2000]
    )
    assert np.abs(int8[:2000] - exact).max() <= q["exact_tolerance"]
    md = (SHIPPED_MODEL / "MODEL_CARD.md").read_text()
    assert f"**{q['test_accuracy'] * 100:.2f} %** int8" in md and "7-bit weights" in md
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["precision"] == "int8" and meta["version"] == card["version"]
    assert json.loads(meta["quantization"])["weight_bits"] == 7


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
