"""Photos of MNIST test digits, brought back by the MNIST procedure, are classified about as well as the
digits themselves (issue 4: "Such photos must be classified about as well as the MNIST test digits")."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from capsnet.model_export.data import load_split
from capsnet.service.preprocess import preprocess_bytes
from tests.service.photos import render_photo

REPO = Path(__file__).resolve().parents[2]
MODEL = Path(os.environ.get("CAPSNET_TEST_MODEL", REPO / "models" / "capsnet-mnist" / "capsnet.onnx"))
N_DIGITS = 500


def classify(model: Path, images: np.ndarray) -> np.ndarray:
    """Predicted class of each (N, 28, 28) float32 image, through onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    predictions = []
    for start in range(0, len(images), 100):
        batch = images[start : start + 100, None].astype(np.float32)  # (B, 1, 28, 28)
        (probabilities,) = session.run(["probabilities"], {"image": batch})  # (B, 10)
        predictions.append(probabilities.argmax(axis=1))
    return np.concatenate(predictions)


@pytest.mark.slow
def test_photos_are_classified_as_well_as_mnist() -> None:
    if not MODEL.is_file():
        pytest.skip(f"no exported model at {MODEL} yet (set CAPSNET_TEST_MODEL to use another)")
    images, labels = load_split("mnist", "test")
    images, labels = images[:N_DIGITS], labels[:N_DIGITS]
    rng = np.random.default_rng(2017)
    photos = np.stack(
        [
            preprocess_bytes(
                render_photo(
                    digit, rng, canvas=(300, 224), scale=rng.uniform(5.0, 8.0), noise=0.03, quality=75
                ),
                mode="mnist",
                max_pixels=10_000_000,
            )
            for digit in images
        ]
    )

    raw_accuracy = float((classify(MODEL, images / 255.0) == labels).mean())
    photo_accuracy = float((classify(MODEL, photos) == labels).mean())
    print(f"\n{MODEL}: raw MNIST {raw_accuracy:.3f}, photos {photo_accuracy:.3f} on {N_DIGITS} test digits")
    assert photo_accuracy >= raw_accuracy - 0.02, (photo_accuracy, raw_accuracy)
