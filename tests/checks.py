"""Comparisons that can fail: a tolerance relative to the values compared, and proof that it rejects the
wrong answers plausible bugs would give."""

from __future__ import annotations

import numpy as np

MARGIN = 10  # a wrong answer must miss the tolerance by at least this factor somewhere


def assert_right_not_wrong(got, want, wrong: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    """`got` equals `want` within rtol (atol: rtol x the largest |want|), and every wrong answer is more
    than MARGIN tolerances away from `want` somewhere: a bug producing it would be caught."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    atol = rtol * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    for name, w in wrong.items():
        w = np.asarray(w, np.float64)
        assert w.shape == want.shape, f"{name}: a shape change is caught by the shapes; compare values"
        miss = np.abs(w - want) / (atol + rtol * np.abs(want))
        assert miss.max() > MARGIN, f"the tolerance cannot tell {name!r} from the right answer"


def skip_last_update(c: np.ndarray, axis: int = 0) -> np.ndarray:
    """The coupling (.., r, N, J) a routing loop without its last update of b would report: iteration r
    repeats iteration r - 1."""
    c = np.moveaxis(c, axis, 0)
    return np.moveaxis(np.concatenate([c[:-1], c[-2:-1]]), 0, axis)


def transposed(c: np.ndarray) -> np.ndarray:
    """(..., N, J) whose memory was written as (..., J, N): the layout error of a transposed tensor."""
    return np.ascontiguousarray(np.swapaxes(c, -1, -2)).reshape(c.shape)


def predicted_classes(model, images_uint8: np.ndarray, batch: int = 1000) -> np.ndarray:
    """argmax of the probabilities for uint8 images (N, 28, 28), by onnxruntime's CPU provider, written
    here so that a test does not check capsnet.model_export.card.evaluate_onnx with itself."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = (images_uint8.astype(np.float32) / 255.0)[:, None]
    runs = [sess.run(["probabilities"], {"image": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(runs).argmax(axis=1)


def sample(metrics: str, series: str) -> float:
    """The value of one series (`name{labels}` as exposed) in a Prometheus text scrape; 0 when absent."""
    for line in metrics.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0
