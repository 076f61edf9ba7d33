"""The models that ship under models/ (capsnet-mnist, the default, and any other folder holding a
capsnet.onnx, served beside it by default), checked through onnxruntime like users run them."""

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from capsnet.model_export.card import evaluate_onnx, onnx_probabilities
from capsnet.model_export.data import get_spec, load_split
from capsnet.service.settings import SHIPPED_MODEL, Settings, shipped_models
from tests.live import ready_client

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in {".png", ".jpg"})
SHIPPED = shipped_models()
# The accuracy through onnxruntime a shipped model must never fall below, by dataset: issue 5 asks for
# >= 99.5 % on MNIST, issue 33 for >= 93.0 % on Fashion-MNIST (ahead of a plain 2-conv CNN). The card's
# own figure is checked below to the tolerance the card states for another CPU.
ACCURACY_FLOOR = {"mnist": 0.995, "fashion-mnist": 0.930}
# Issue 21: the int8 variant may lose at most 0.1 point against fp32 on the same 10,000 test images.
INT8_MAX_DROP = 0.001


def card_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "model_card.json").read_text())


@pytest.mark.parametrize("model_dir", SHIPPED, ids=lambda d: d.name)
def test_shipped_artifacts_are_complete_and_small(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"capsnet.onnx", "decoder.onnx", "model_card.json", "MODEL_CARD.md"} <= names
    # int8: shipped, or refused with the card saying why; the default model must have it
    # (CAPSNET_PRECISION=int8 serves a model beside it without the file in fp32, never the default one)
    refused = card_of(model_dir).get("int8", {}).get("written") is False
    assert ("capsnet-int8.onnx" in names) != refused
    assert model_dir != SHIPPED_MODEL or not refused
    assert not any(n.endswith((".pt", ".pth", ".ckpt")) for n in names)  # no checkpoints, no optimizer state
    total = sum(p.stat().st_size for p in model_dir.iterdir())
    assert total < 45 * 2**20


def assert_matches_card(preds: np.ndarray, y: np.ndarray, figures: dict) -> None:
    """Errors as the card counts them, within the near ties it names: the images whose top two
    lengths are so close that another CPU's summation order can change their class."""
    errors = int((preds != y).sum())
    assert figures["near_ties"]["images"] <= 20, "a tolerance that wide says nothing"
    assert abs(errors - figures["errors"]) <= figures["near_ties"]["images"], (errors, figures)
    assert errors == round((1 - figures["test_accuracy"]) * len(y))  # the card's two figures agree


@pytest.mark.slow
@pytest.mark.parametrize("model_dir", SHIPPED, ids=lambda d: d.name)
def test_shipped_model_accuracy_through_onnxruntime_matches_its_card(model_dir):
    card = card_of(model_dir)
    ev, dataset = card["evaluation"], card["dataset"]["name"]
    x, y = load_split(dataset, "test")
    preds = evaluate_onnx(model_dir / "capsnet.onnx", x)
    assert_matches_card(preds, y, ev)
    floor = ACCURACY_FLOOR[dataset]
    assert float((preds == y).mean()) >= floor and ev["test_accuracy"] >= floor
    assert card["parameters"]["total"] == 8_215_568 and card["config"]["routing_iterations"] == 3
    md = (model_dir / "MODEL_CARD.md").read_text()
    assert f"**{ev['test_accuracy'] * 100:.2f} %**" in md and ev["cpu"]["model"] in md
    assert f"{ev['near_ties']['images']} test image(s) whose top two lengths are within 0.0001" in md


def test_a_server_with_the_defaults_serves_every_shipped_model_by_name_with_onnxruntimes_numbers():
    """Issue 33: what `make serve` starts. Each shipped model by its name, with its dataset's labels, and
    real test images of that dataset answered as onnxruntime answers on the file itself."""
    with ready_client(Settings(model_dir=SHIPPED_MODEL, model_dirs=None, max_batch_size=16)) as client:
        models = client.get("/metadata").json()["models"]
        assert [(m["name"], m["default"]) for m in models] == [
            (card_of(d)["name"], d == SHIPPED_MODEL) for d in SHIPPED
        ]
        for model_dir, listed in zip(SHIPPED, models, strict=True):
            dataset = card_of(model_dir)["dataset"]["name"]
            labels = list(get_spec(dataset).labels)
            assert listed["labels"] == labels and listed["ready"]
            x, y = load_split(dataset, "test")
            images = x[:16].astype(np.float32) / 255.0
            r = client.post("/predict", params={"model": listed["name"]}, json={"images": images.tolist()})
            assert r.status_code == 200, r.text
            got = r.json()["predictions"]
            want = onnx_probabilities(model_dir / "capsnet.onnx", x[:16])
            np.testing.assert_allclose([item["probabilities"] for item in got], want, atol=1e-5)
            assert [item["label"] for item in got] == [labels[k] for k in want.argmax(1)]
            # the labels in their order: a shuffled label list would be right about one time in ten
            assert sum(item["label"] == labels[k] for item, k in zip(got, y[:16], strict=True)) >= 14


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
