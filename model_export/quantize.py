"""The int8 variant of an exported CapsNet, for CPU-only hosts.

The two convolutions (Conv1 with its ReLU, and PrimaryCaps), where nearly all the FLOPs are, run in
int8: static quantization with onnxruntime's own tools, QDQ format, weights signed 8-bit per output
channel, activations unsigned 8-bit (u8 x s8 is the pair onnxruntime's MLAS runs on VNNI's vpdpbusd;
s8 activations measured 0.73x fp32 on this CPU, u8 2.7x). The squash, the routing's products, softmax
and sums stay in fp32. The ranges come from images of the *training* split only. The pre-processing
pass only infers shapes: its optimizer would fold the graph's three reorderings of DigitCaps' W into
three initializers (11.3 -> 23.0 MB, no faster); onnxruntime folds them when it loads the file.

Nothing is written unless the int8 model's test accuracy through onnxruntime is within
MAX_ACCURACY_DROP of the fp32 model's, both measured here on the same images; both figures go into the
file's metadata and, where the directory has one, the model card. onnx + onnxruntime, no torch.
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

from model_export.data import file_sha256, load_split

log = logging.getLogger(__name__)

INT8_FILE = "capsnet-int8.onnx"  # the name the service loads under CAPSNET_PRECISION=int8
QUANTIZED_OPS = ("Conv", "Relu")  # Relu so that Conv1's ReLU folds into its int8 output range
CALIBRATION_IMAGES = 512
CALIBRATION_SEED = 0
MAX_ACCURACY_DROP = 0.001  # 0.1 percentage point, on the fraction scale


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
) -> None:
    """Static int8 quantization of `src` into `dst`, ranges from `images` (MinMax, batches of 64).

    The options are those measured against each other (bench: QDQ vs QOperator, per channel vs per
    tensor, Conv alone vs Conv + ReLU, u8 vs s8 activations); the defaults are what ships.
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
        )
    if qdq:
        import onnx

        proto = onnx.load(str(dst))
        _branches_read_dequantized(proto.graph)
        onnx.save(proto, str(dst))


def _branches_read_dequantized(graph: Any) -> None:
    """Finish quantize_static's QDQ rewiring for a graph with an If (the classifier's switch on the
    batch size). It gives each quantized tensor X a QuantizeLinear -> DequantizeLinear pair and points
    X's readers at the pair's output, but not those inside the If's branches: they still read the
    PrimaryCaps convolution's float output, so the convolution has a reader besides its QuantizeLinear
    and onnxruntime leaves it in fp32 (no QLinearConv). Here the branches read the pair's output, the
    batch-size Shape reads the raw image (a shape needs no dequantizing), and the If moves after the
    pairs it now reads (they were appended after it)."""
    from model_export.fp16 import graphs

    made_by = {o: n for n in graph.node for o in n.output}
    dequantized = {  # X -> DequantizeLinear(QuantizeLinear(X))
        made_by[n.input[0]].input[0]: n.output[0]
        for n in graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in made_by
        and made_by[n.input[0]].op_type == "QuantizeLinear"
    }
    raw = {dq: x for x, dq in dequantized.items()}
    switches = [n for n in graph.node if n.op_type == "If"]
    for node in graph.node:
        if node.op_type == "Shape" and node.input[0] in raw:
            node.input[0] = raw[node.input[0]]
    for switch in switches:
        for attr in switch.attribute:
            for sub in graphs(attr.g):
                for node in sub.node:
                    node.input[:] = [dequantized.get(x, x) for x in node.input]
    rest = [n for n in graph.node if n.op_type != "If"]
    del graph.node[:]
    graph.node.extend([*rest, *switches])


def _accuracy(model: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    from model_export.card import evaluate_onnx

    preds = evaluate_onnx(model, x)
    return float((preds == y).mean()), int((preds != y).sum())


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
    when int8 falls more than `max_drop` below fp32. Updates model_card.json / MODEL_CARD.md if present.
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
        fp32_acc, fp32_err = _accuracy(src, x_test, y_test)
        int8_acc, int8_err = _accuracy(out, x_test, y_test)
        report: dict[str, Any] = {
            "file": INT8_FILE,
            "format": "QDQ",
            "quantized_ops": list(QUANTIZED_OPS),
            "weights": "int8, per output channel",
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
            "test_images": len(y_test),
            "fp32_test_accuracy": fp32_acc,
            "fp32_errors": fp32_err,
            "test_accuracy": int8_acc,
            "errors": int8_err,
            "max_drop": max_drop,
            "quantize_seconds": round(quantize_seconds, 1),
        }
        if int8_acc < fp32_acc - max_drop:
            raise QuantizeError(
                f"int8 test accuracy {int8_acc:.4%} is more than {max_drop:.2%} below fp32's {fp32_acc:.4%} "
                f"on {len(y_test)} test images; {INT8_FILE} not written"
            )
        _set_metadata(out, meta, {"precision": "int8", "quantization": json.dumps(report)})
        shutil.move(str(out), model_dir / INT8_FILE)
    report["sha256"] = file_sha256(model_dir / INT8_FILE)
    report["bytes"] = (model_dir / INT8_FILE).stat().st_size
    _update_card(model_dir, report)
    log.info("wrote %s: int8 %.4f vs fp32 %.4f", model_dir / INT8_FILE, int8_acc, fp32_acc)
    return report


def _update_card(model_dir: Path, report: dict[str, Any]) -> None:
    from model_export.card import render_markdown

    path = model_dir / "model_card.json"
    if not path.exists():
        return
    card = json.loads(path.read_text())
    card["int8"] = report
    path.write_text(json.dumps(card, indent=1) + "\n")
    (model_dir / "MODEL_CARD.md").write_text(render_markdown(card))
