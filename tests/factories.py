"""Small real artifacts for the tests: seeded tiny checkpoints and their ONNX exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from capsnet.model_export.config import CapsNetConfig
from capsnet.model_export.data import get_spec
from capsnet.model_export.model import CapsNet
from capsnet.model_export.train import CHECKPOINT_FORMAT, save_checkpoint

TINY = {"conv1_channels": 16, "primary_types": 4}
# Untrained at its initial scale, the tiny model's numbers are minute (capsule lengths ~1e-5, coupling
# within 2e-7 of the uniform 0.1 after routing), so no tolerance could tell right from wrong. With the
# convolutions x3 and W x30, on MNIST test digits: lengths 0.58-0.93, pose components up to 0.6, and the
# routing moves the coupling by up to 0.08 (iteration 2) and 0.15 (iteration 3), to within 0.02-0.33.
CONV_GAIN, W_GAIN = 3.0, 30.0


def make_checkpoint(path: Path, r: int = 3, seed: int = 0, dataset: str = "mnist") -> CapsNet:
    """A seeded, untrained tiny CapsNet saved as a `capsnet train` checkpoint (weights scaled: above),
    as if trained on `dataset` (its name and labels; its export gets the dataset's preprocessing)."""
    torch.manual_seed(seed)
    cfg = CapsNetConfig(routing_iterations=r, **TINY)
    model = CapsNet(cfg)
    with torch.no_grad():
        model.conv1.weight.mul_(CONV_GAIN)
        model.primary.conv.weight.mul_(CONV_GAIN)
        model.digits.W.mul_(W_GAIN)
    save_checkpoint(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "epoch": 1,
            "dataset": dataset,
            "dataset_sha256": "d" * 64,
            "labels": list(get_spec(dataset).labels),
            "test_accuracy": 0.5,
            "history": [],
        },
    )
    return model.eval()


def mnist_test_images(n: int) -> np.ndarray:
    from capsnet.model_export.data import load_split

    x, _ = load_split("mnist", "test")
    return (x[:n].astype(np.float32) / 255.0)[:, None]
