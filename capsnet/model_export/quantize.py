"""The int8 variant of an exported CapsNet, for CPU-only hosts.

The two convolutions (Conv1 with its ReLU, and PrimaryCaps), where nearly all the FLOPs are, run in
int8: static quantization with onnxruntime's own tools, QDQ format, weights signed per output channel in
a 7-bit range, activations unsigned 8-bit (u8 x s8 is the pair onnxruntime's MLAS runs on VNNI's
vpdpbusd; s8 activations ran slower than fp32). The squash, the routing's products, softmax and sums stay
in fp32. The ranges come from images of the *training* split only. The pre-processing pass only infers
shapes: its optimizer would fold the graph's reorderings of DigitCaps' W into more initializers (a larger
file, no faster); onnxruntime folds them when it loads the file.

Why 7-bit weights (`reduce_range`): without VNNI, MLAS sums pairs of u8 x s8 products in 16 bits with
saturation (capsnet/service/cpu.py), so 8-bit weights give answers that depend on the CPU. With weights in
[-64, 64] no pair can saturate: every x86 CPU computes the same integers, at the same speed as 8-bit
weights (the same kernels), for one bit less of weight precision.

No int8 file is written unless, on the test images through onnxruntime, (1) the int8 accuracy is within
MAX_ACCURACY_DROP of the fp32 model's and (2) the int8 probabilities are within EXACT_TOLERANCE of exact
integer arithmetic (the same file run with graph optimizations off: DequantizeLinear, then fp32 Conv),
so a CPU whose kernels saturate is caught where the file is made. The figures go into the file's
metadata and, where the directory has one, the model card; so does an accuracy refusal, so that a
model shipped without int8 says why. onnx + onnxruntime, no torch.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from capsnet.model_export.card import measured_on, near_ties
from capsnet.model_export.data import file_sha256, load_split

log = logging.getLogger(__name__)

INT8_FILE = "capsnet-int8.onnx"  # the name the service loads under CAPSNET_PRECISION=int8
QUANTIZED_OPS = ("Conv", "Relu")  # Relu so that Conv1's ReLU folds into its int8 output range
CALIBRATION_IMAGES = 512
CALIBRATION_SEED = 0
MAX_ACCURACY_DROP = 0.001  # 0.1 percentage point, on the fraction scale
WEIGHT_BITS = 7  # the service refuses a file without it on a CPU whose int8 sums saturate
# The most an int8 probability may differ from exact integer arithmetic on the CPU that runs the file:
# requantizing rounds an activation one step either way; saturation moves answers by tenths.
EXACT_TOLERANCE = 0.01
# Two CPUs within EXACT_TOLERANCE of the same integers differ by at most twice it, so an image's class
# can only change between them where its top two probabilities are within twice that again.
CROSS_CPU_MARGIN = 4 * EXACT_TOLERANCE


class QuantizeError(RuntimeError):
    """The int8 model could not be written (accuracy lost, no model); nothing was written."""


def calibration_images(dataset: str, n: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """`n` seeded random images of the dataset's training split as float32 (n, 1, 28, 28) in [0, 1]."""
    x, _ = load_split(dataset, "train")
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False))
    return (x[idx].astype(np.float32) / 255.0)[:, None]


def quantize_file(
    src: Path,
    dst: Path,
    images: np.ndarray,
    *,
    ops: tuple[str, ...] = QUANTIZED_OPS,
    per_channel: bool = True,
    qdq: bool = True,
    activations: str = "u8",
    reduce_range: bool = True,
) -> None:
    """Static int8 quantization of `src` into `dst`, ranges from `images` (MinMax, batches of 64).

    The options are those measured against each other (QDQ vs QOperator, per channel vs per tensor, Conv
    alone vs Conv + ReLU, u8 vs s8 activations, 7- vs 8-bit weights); the defaults are what ships.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter(images[i : i + 64] for i in range(0, len(images), 64))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"image": np.ascontiguousarray(batch)}

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, skip_optimization=True)
        quantize_static(
            str(pre),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator,
            op_types_to_quantize=list(ops),
            per_channel=per_channel,
            activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=reduce_range,
        )


def _probabilities(model: Path, x: np.ndarray, *, exact: bool = False) -> np.ndarray:
    """Capsule lengths through onnxruntime's CPU provider. `exact`: graph optimizations off, so each
    DequantizeLinear feeds an fp32 Conv and no int8 kernel runs: what exact integer sums give."""
    import onnxruntime as ort

    from capsnet.model_export.card import onnx_probabilities

    options = ort.SessionOptions()
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnx_probabilities(
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]), x
    )


def _set_metadata(path: Path, source_meta: dict[str, str], extra: dict[str, str]) -> None:
    """The fp32 file's metadata unchanged (name, version, labels, ...) plus `extra`, nothing else."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {**source_meta, **extra})
    onnx.save(proto, str(path))


def write_int8(
    model_dir: Path,
    *,
    calibration: int = CALIBRATION_IMAGES,
    test_limit: int | None = None,
    max_drop: float = MAX_ACCURACY_DROP,
) -> dict[str, Any]:
    """Write `capsnet-int8.onnx` beside `capsnet.onnx` if it keeps the accuracy; return the report.

    Calibration: `calibration` training images. Accuracy: the first `test_limit` test images (all by
    default), fp32 and int8 through onnxruntime's CPU provider. Raises QuantizeError, writing nothing,
    when int8 falls more than `max_drop` below fp32 (the card then records the refusal and its
    figures, where no int8 file is there). Updates model_card.json / MODEL_CARD.md if present.
    """
    import onnx

    model_dir = Path(model_dir)
    src = model_dir / "capsnet.onnx"
    if not src.is_file():
        raise QuantizeError(f"{src} not found (run `capsnet export` first)")
    meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    dataset = meta.get("dataset", "mnist")
    x_test, y_test = load_split(dataset, "test")
    x_test, y_test = x_test[:test_limit], y_test[:test_limit]
    t0 = time.perf_counter()
    images = calibration_images(dataset, calibration)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / INT8_FILE
        quantize_file(src, out, images)
        quantize_seconds = time.perf_counter() - t0
        fp32 = _probabilities(src, x_test)
        int8 = _probabilities(out, x_test)
        exact = _probabilities(out, x_test, exact=True)
        fp32_pred, int8_pred = fp32.argmax(1), int8.argmax(1)
        fp32_acc, int8_acc = float((fp32_pred == y_test).mean()), float((int8_pred == y_test).mean())
        gap = float(np.abs(int8 - exact).max())
        moved = np.abs(int8 - fp32).max(axis=1)  # per image: how far int8 moved its largest change
        report: dict[str, Any] = {
            "file": INT8_FILE,
            "format": "QDQ",
            "quantized_ops": list(QUANTIZED_OPS),
            "weights": f"int8 in a {WEIGHT_BITS}-bit range, per output channel",
            "weight_bits": WEIGHT_BITS,
            "activations": "uint8, per tensor",
            "fp32_ops": "squash, routing products, softmax, sums, lengths",
            "calibration": {
                "dataset": dataset,
                "split": "train",
                "images": len(images),
                "seed": CALIBRATION_SEED,
                "method": "MinMax",
            },
            "runtime": "onnxruntime CPUExecutionProvider",
            "cpu": measured_on(),
            "test_images": len(y_test),
            "fp32_test_accuracy": fp32_acc,
            "fp32_errors": int((fp32_pred != y_test).sum()),
            "test_accuracy": int8_acc,
            "errors": int((int8_pred != y_test).sum()),
            "max_drop": max_drop,
            "exact_integer_accuracy": float((exact.argmax(1) == y_test).mean()),
            "max_gap_to_exact_integers": gap,
            "exact_tolerance": EXACT_TOLERANCE,
            "near_ties": {"margin": CROSS_CPU_MARGIN, "images": near_ties(int8, CROSS_CPU_MARGIN)},
            "vs_fp32": {"max": float(moved.max()), "p99": float(np.quantile(moved, 0.99))},
            "quantize_seconds": round(quantize_seconds, 1),
        }
        if int8_acc < fp32_acc - max_drop:
            refused = (
                f"int8 test accuracy {int8_acc:.4%} is more than {max_drop:.2%} below fp32's {fp32_acc:.4%} "
                f"on {len(y_test)} test images; {INT8_FILE} not written"
            )
            # The card says why the model has no int8 file (unless one from before is still there:
            # the card describes that one).
            if not (model_dir / INT8_FILE).exists():
                _update_card(model_dir, {**report, "written": False, "refused": refused})
            raise QuantizeError(refused)
        if gap > EXACT_TOLERANCE:
            raise QuantizeError(
                f"int8 probabilities differ from exact integer arithmetic by up to {gap:.3f} (over "
                f"{EXACT_TOLERANCE}) on this CPU ({report['cpu']['int8_kernels']}): its int8 sums "
                f"saturate with these weights; {INT8_FILE} not written"
            )
        _set_metadata(out, meta, {"precision": "int8", "quantization": json.dumps(report)})
        shutil.move(str(out), model_dir / INT8_FILE)
    report["written"] = True
    report["sha256"] = file_sha256(model_dir / INT8_FILE)
    report["bytes"] = (model_dir / INT8_FILE).stat().st_size
    _update_card(model_dir, report)
    log.info("wrote %s: int8 %.4f vs fp32 %.4f", model_dir / INT8_FILE, int8_acc, fp32_acc)
    return report


def _update_card(model_dir: Path, report: dict[str, Any]) -> None:
    from capsnet.model_export.card import render_markdown

    path = model_dir / "model_card.json"
    if not path.exists():
        return
    card = json.loads(path.read_text())
    card["int8"] = report
    path.write_text(json.dumps(card, indent=1) + "\n")
    (model_dir / "MODEL_CARD.md").write_text(render_markdown(card))
