"""Fixtures the protocol tests share (v2 over REST and over gRPC): the reference onnxruntime sessions
of the two models those servers serve, and the images sent to them."""

import onnxruntime as ort
import pytest

from capsnet.service.settings import SHIPPED_MODEL
from tests.factories import mnist_test_images


@pytest.fixture(scope="module")
def sessions(tiny_model_dir):
    """The ONNX files themselves, by model name: the reference for metadata and numbers."""
    paths = {"capsnet-mnist": SHIPPED_MODEL, "tiny": tiny_model_dir}
    return {
        name: ort.InferenceSession(str(d / "capsnet.onnx"), providers=["CPUExecutionProvider"])
        for name, d in paths.items()
    }


@pytest.fixture(scope="module")
def images():
    return mnist_test_images(5)  # (5, 1, 28, 28) float32 in [0, 1]
