"""A Triton Inference Server model repository from an exported model directory.

    REPO/capsnet/config.pbtxt            onnxruntime backend, dynamic batching, warm-up, GPU instances
    REPO/capsnet/labels.txt              class labels, for Triton's classification extension
    REPO/capsnet/1/model.onnx            a copy of capsnet.onnx
    REPO/capsnet_decoder/...             the same for decoder.onnx, when the directory has one

Needs no torch: the names, dims and types come from the ONNX file itself, read with onnxruntime (which
the serving install has), and the labels from its metadata. config.pbtxt is protobuf text format for
Triton's `inference.ModelConfig`; it is written as text so that no Triton package is needed here, and
the tests parse it back into the real message (tritonclient's model_config_pb2).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsnet.model_export.data import file_sha256

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "capsnet.onnx"
DECODER_FILE = "decoder.onnx"
# The classifier output that the labels belong to (one score per class).
LABELLED_OUTPUT = "probabilities"

# onnxruntime's type strings -> Triton's DataType names (model_config.proto).
TRITON_TYPES = {
    "tensor(bool)": "TYPE_BOOL",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(float16)": "TYPE_FP16",
    "tensor(float)": "TYPE_FP32",
    "tensor(double)": "TYPE_FP64",
    "tensor(string)": "TYPE_STRING",
    "tensor(bfloat16)": "TYPE_BF16",
}
# Triton model names become URL path segments and directory names.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class TritonExportError(ValueError):
    """The model cannot be described to Triton as asked (e.g. no dynamic batch axis)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton DataType name, e.g. TYPE_FP32
    dims: tuple[int, ...]  # without the batch axis; -1 = variable


@dataclass(frozen=True)
class OnnxSignature:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    metadata: dict[str, str]


@dataclass(frozen=True)
class TritonOptions:
    max_batch_size: int = 64  # as CAPSNET_MAX_BATCH_SIZE
    max_queue_delay_us: int = 2000  # as CAPSNET_MAX_WAIT_MS = 2
    instance_kind: str = "gpu"  # gpu | cpu
    instance_count: int = 1
    version: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise TritonExportError("max_batch_size must be >= 1 (dynamic batching needs a batch axis)")
        if self.max_queue_delay_us < 0 or self.instance_count < 1 or self.version < 1:
            raise TritonExportError("max_queue_delay_us >= 0, instance_count >= 1 and version >= 1")
        if self.instance_kind not in ("gpu", "cpu"):
            raise TritonExportError(f"instance_kind must be gpu or cpu, not {self.instance_kind!r}")


def read_signature(path: Path) -> OnnxSignature:
    """Inputs, outputs (batch axis dropped) and metadata of an ONNX file, as onnxruntime sees them."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only reading it
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def tensors(args: Sequence[Any]) -> tuple[Tensor, ...]:
        out = []
        for a in args:
            if a.type not in TRITON_TYPES:
                raise TritonExportError(f"{path.name}: {a.name} has type {a.type}, unknown to Triton")
            shape = list(a.shape)
            if not shape or isinstance(shape[0], int):
                raise TritonExportError(
                    f"{path.name}: {a.name} has shape {shape}; the first axis must be the dynamic batch axis"
                )
            dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape[1:])
            out.append(Tensor(a.name, TRITON_TYPES[a.type], dims))
        return tuple(out)

    meta = dict(sess.get_modelmeta().custom_metadata_map)
    return OnnxSignature(tensors(sess.get_inputs()), tensors(sess.get_outputs()), meta)


# -- protobuf text format ------------------------------------------------------------------------


class Enum(str):
    """An enum value: written bare (`kind: KIND_GPU`), not quoted."""


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)  # \" \\ \n \uXXXX: all valid text-format escapes
    raise TypeError(f"no text format for {value!r}")


def to_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a message given as {field: value}. A dict is a sub-message, a list
    of dicts a repeated message (one block each; a map is a list of {key, value}), a list of
    scalars a repeated scalar (`dims: [1, 28, 28]`)."""
    pad = "  " * indent
    lines = []
    for field, value in message.items():
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not any(isinstance(v, dict) for v in value):
            lines.append(f"{pad}{field}: [{', '.join(_scalar(v) for v in value)}]")
            continue
        for item in items:
            if isinstance(item, dict):
                lines.append(f"{pad}{field} {{\n{to_pbtxt(item, indent + 1)}{pad}}}")
            else:
                lines.append(f"{pad}{field}: {_scalar(item)}")
    return "".join(line + "\n" for line in lines)


# -- the config ----------------------------------------------------------------------------------


def model_config(
    name: str, sig: OnnxSignature, opts: TritonOptions, *, label_file: str | None = None
) -> dict[str, Any]:
    """Triton's ModelConfig for one ONNX model, as a dict for `to_pbtxt`."""

    def output(t: Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {"name": t.name, "data_type": Enum(t.data_type), "dims": list(t.dims)}
        if label_file and t.name == LABELLED_OUTPUT:
            out["label_filename"] = label_file
        return out

    def warmup(batch: int) -> dict[str, Any]:
        return {
            "name": f"zeros_batch_{batch}",
            "batch_size": batch,
            "inputs": [
                {
                    "key": t.name,
                    "value": {"data_type": Enum(t.data_type), "dims": list(t.dims), "zero_data": True},
                }
                for t in sig.inputs
            ],
        }

    if any(d < 0 for t in sig.inputs for d in t.dims):
        # zero_data warm-up needs concrete dims; our exports pin every non-batch axis.
        raise TritonExportError(f"{name}: inputs with variable non-batch dims cannot be warmed up")
    return {
        "name": name,
        "backend": "onnxruntime",
        "max_batch_size": opts.max_batch_size,
        "version_policy": {"latest": {"num_versions": 1}},
        "input": [{"name": t.name, "data_type": Enum(t.data_type), "dims": list(t.dims)} for t in sig.inputs],
        "output": [output(t) for t in sig.outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": opts.max_queue_delay_us},
        "instance_group": [
            {"count": opts.instance_count, "kind": Enum(f"KIND_{opts.instance_kind.upper()}")}
        ],
        "default_model_filename": "model.onnx",
        # The first request should not pay for CUDA/cuDNN initialisation: B = 1 and the largest batch.
        "model_warmup": [warmup(b) for b in sorted({1, opts.max_batch_size})],
    }


def _write_model(
    onnx_path: Path, repo: Path, name: str, opts: TritonOptions, *, with_labels: bool
) -> dict[str, Any]:
    sig = read_signature(onnx_path)
    model_dir = repo / name
    (model_dir / str(opts.version)).mkdir(parents=True, exist_ok=True)
    label_file = None
    labels = json.loads(sig.metadata["labels"]) if with_labels and "labels" in sig.metadata else None
    if labels is not None:
        label_file = "labels.txt"
        (model_dir / label_file).write_text("".join(f"{label}\n" for label in labels))
    config = model_config(name, sig, opts, label_file=label_file)
    header = (
        f"# Triton model configuration written by `capsnet triton` from {onnx_path.name}\n"
        f"# (sha256 {file_sha256(onnx_path)}, model {sig.metadata.get('name', '?')} "
        f"version {sig.metadata.get('version', '?')}).\n"
    )
    (model_dir / "config.pbtxt").write_text(header + to_pbtxt(config))
    shutil.copyfile(onnx_path, model_dir / str(opts.version) / "model.onnx")
    return {"name": name, "path": str(model_dir), "inputs": len(sig.inputs), "outputs": len(sig.outputs)}


def write_repository(
    model_dir: Path, repo: Path, *, name: str = "capsnet", options: TritonOptions | None = None
) -> list[dict[str, Any]]:
    """Write REPO/<name> (the classifier) and REPO/<name>_decoder (when decoder.onnx exists)."""
    opts = options or TritonOptions()
    if not _MODEL_NAME.match(name):
        raise TritonExportError(f"model name {name!r}: letters, digits, '_', '.', '-' only")
    classifier = model_dir / CLASSIFIER_FILE
    if not classifier.is_file():
        raise TritonExportError(f"{model_dir} has no {CLASSIFIER_FILE}")
    written = [_write_model(classifier, repo, name, opts, with_labels=True)]
    decoder = model_dir / DECODER_FILE
    if decoder.is_file():
        written.append(_write_model(decoder, repo, f"{name}_decoder", opts, with_labels=False))
    log.info("Triton repository %s: %s", repo, ", ".join(w["name"] for w in written))
    return written
