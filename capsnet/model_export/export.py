"""Export a trained CapsNet to ONNX: `capsnet.onnx` (routing unrolled r times) and `decoder.onnx`.

Both go through torch.export (`torch.onnx.export(..., dynamo=True)`, which needs onnxscript, in the
`train` extra) at OPSET, its lowest (its converter down to 17 fails on ReduceSum's axes input).

The classifier is one static dataflow graph. Routing is a Python `for` over an int r, so the graph holds
exactly r copies of the iteration, and it routes without forming the votes û
(`capsules.route_without_votes`) at every batch size. No Loop, Scan or If may appear (checked: the
export fails otherwise), so TensorRT, CUDA graphs and any ONNX tool take the file as it is. Dim 0 is a
dynamic `batch` axis, and parity is checked at several batch sizes after export.

Nothing is folded into the file (see `to_onnx`), so every parameter is stored once under its own name
(`train.weights_from_export` reads them back by name; checked). The routing reads DigitCaps' W in three
layouts: onnxruntime folds them when it loads the graph, where in the file each would be one more copy
of W.

The export is verified before anything is written to its destination: checker (full_check), then
onnxruntime (CPU) against PyTorch on real test images for several batch sizes; any output off by more
than the tolerance aborts the export.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from capsnet.model_export.config import CapsNetConfig
from capsnet.model_export.data import file_sha256, get_spec, load_split
from capsnet.model_export.model import CapsNet
from capsnet.model_export.train import build_model, load_checkpoint

log = logging.getLogger(__name__)

OPSET = 18  # torch.export's lowest
PARITY_ATOL = 1e-5
PARITY_BATCHES = (1, 7, 64)
# The issue's three outputs, plus the primary capsules' lengths that weight the routing summaries.
MODEL_OUTPUTS = ("probabilities", "poses", "coupling", "primary_activations")


class ExportError(RuntimeError):
    """The export could not be verified; nothing was written."""


class _ClassifierGraph(nn.Module):
    """`CapsNet.run` as the module to export; its parameters keep their names under `model.`."""

    def __init__(self, model: CapsNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(self.model.run(image))  # type: ignore[return-value]


class _DecoderGraph(nn.Module):
    def __init__(self, model: CapsNet) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, poses: Tensor, mask: Tensor) -> Tensor:
        return self.decoder(poses, mask)


def to_onnx(
    module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str]
) -> None:
    """`module` -> ONNX at `path` through torch.export at OPSET, dim 0 of every input and output one
    dynamic `batch` axis. The graph is written as recorded (`optimize=False`): onnxruntime folds and
    fuses it when it loads it, to the same speed, while onnxscript's optimizer rewrites x + 1e-8 as
    x + 0, dropping the eps inside the squash's square root."""
    module = module.eval()
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's pytree and shape notes
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes={name: {0: batch} for name in inputs},
            optimize=False,
            verbose=False,
        )
    assert program is not None
    onnx.save(program.model_proto, str(path))


def _pin_shapes(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """Write the known non-batch dims of each input/output into the graph and name the batch axis
    `batch` (torch.export names it after the Dim, but the contract should not hang on that);
    check_model(full_check=True) then verifies them against shape inference."""
    for vi in (*proto.graph.input, *proto.graph.output):
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, size in zip(dims[1:], shapes[vi.name], strict=True):
                d.ClearField("dim_param")
                d.dim_value = size
            dims[0].dim_param = "batch"


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def metadata_for(state: dict[str, Any], checkpoint_hash: str, name: str) -> dict[str, str]:
    cfg = CapsNetConfig.from_dict(state["config"])
    return {
        "name": name,
        "version": f"{state['dataset']}-e{state['epoch']}-{checkpoint_hash[:8]}",
        "labels": json.dumps(state["labels"]),
        "routing_iterations": str(cfg.routing_iterations),
        "config": json.dumps(cfg.to_dict()),
        "dataset": state["dataset"],
        "dataset_sha256": state["dataset_sha256"],
        "preprocess": get_spec(state["dataset"]).preprocess,  # the service's default for this model
        "test_accuracy": repr(float(state["test_accuracy"])),
        "epochs": str(state["epoch"]),
        "checkpoint_sha256": checkpoint_hash,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "primary_capsules": json.dumps(
            {
                "count": cfg.num_primary,
                "types": cfg.primary_types,
                "grid": [cfg.primary_grid, cfg.primary_grid],
                "order": ["type", "row", "col"],
            }
        ),
        "opset": str(OPSET),
    }


def _check_parity(
    model: CapsNet, cls_path: Path, dec_path: Path, images: np.ndarray, batches: tuple[int, ...]
) -> dict[str, float]:
    """Max |ORT - torch| per output over several batch sizes; raise ExportError past PARITY_ATOL."""
    cls_sess, dec_sess = _ort_session(cls_path), _ort_session(dec_path)
    worst = dict.fromkeys((*MODEL_OUTPUTS, "reconstruction"), 0.0)
    start = 0
    for B in batches:
        x = images[start : start + B]
        start += B
        with torch.inference_mode():
            ref = [t.numpy() for t in model.run(torch.from_numpy(x))]
            mask = np.eye(model.config.num_classes, dtype=np.float32)[ref[0].argmax(1)]
            ref_rec = model.decoder(torch.from_numpy(ref[1]), torch.from_numpy(mask)).numpy()
        got = cls_sess.run(list(MODEL_OUTPUTS), {"image": x})
        got_rec = dec_sess.run(["reconstruction"], {"poses": ref[1], "mask": mask})[0]
        for name, r, g in zip(
            (*MODEL_OUTPUTS, "reconstruction"), (*ref, ref_rec), (*got, got_rec), strict=True
        ):
            if r.shape != g.shape:
                raise ExportError(f"{name}: ORT shape {g.shape} != torch {r.shape} at B={B}")
            worst[name] = float(np.maximum(worst[name], np.abs(r - g).max()))  # (a NaN stays NaN)
    bad = {k: v for k, v in worst.items() if not v <= PARITY_ATOL}
    if bad:
        raise ExportError(f"ORT/PyTorch parity failed (max abs diff > {PARITY_ATOL}): {bad}")
    return worst


def export(
    checkpoint: Path,
    output: Path,
    *,
    name: str = "capsnet",
    images: np.ndarray | None = None,
    batches: tuple[int, ...] = PARITY_BATCHES,
) -> dict[str, Any]:
    """Export `checkpoint` into directory `output` (capsnet.onnx, decoder.onnx, export.json).

    `images`: float32 (N, 1, 28, 28) parity inputs; default: the real test images of the checkpoint's
    dataset. Returns the report (parity errors, metadata). Nothing is written when a check fails.
    """
    state = load_checkpoint(checkpoint)
    model = build_model(state).eval()
    if images is None:
        x, _ = load_split(state["dataset"], "test")
        images = (x[: sum(batches)].astype(np.float32) / 255.0)[:, None]
    images = np.ascontiguousarray(images, dtype=np.float32)
    meta = metadata_for(state, file_sha256(checkpoint), name)
    report = export_model(model, output, meta, images, batches, source=str(checkpoint))
    log.info("exported %s -> %s; parity %s", checkpoint, output, report["parity_max_abs_diff"])
    return report


def export_model(
    model: CapsNet,
    output: Path,
    meta: dict[str, str],
    images: np.ndarray,
    batches: tuple[int, ...] = PARITY_BATCHES,
    *,
    source: str,
) -> dict[str, Any]:
    """The export of `model` (weights already loaded) with metadata `meta`, verified, into `output`.

    `export` builds the model and metadata from a checkpoint; a shipped model can be re-exported from
    its own files (`train.weights_from_export` and its metadata) with the same call.
    """
    model = model.eval()
    cfg = model.config
    meta = {**meta, "opset": str(OPSET)}  # the file's, whatever `meta` was read back from
    images = np.ascontiguousarray(images, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cls_path, dec_path = Path(tmp) / "capsnet.onnx", Path(tmp) / "decoder.onnx"
        to_onnx(
            _ClassifierGraph(model), (torch.from_numpy(images[:2]),), cls_path, ["image"], list(MODEL_OUTPUTS)
        )
        poses = torch.zeros(2, cfg.num_classes, cfg.digit_dim)
        mask = torch.zeros(2, cfg.num_classes)
        to_onnx(_DecoderGraph(model), (poses, mask), dec_path, ["poses", "mask"], ["reconstruction"])
        J, D, r, N = cfg.num_classes, cfg.digit_dim, cfg.routing_iterations, cfg.num_primary
        img = (cfg.in_channels, cfg.image_size, cfg.image_size)
        cls_shapes = {
            "image": img,
            "probabilities": (J,),
            "poses": (J, D),
            "coupling": (r, N, J),
            "primary_activations": (N,),
        }
        dec_shapes = {"poses": (J, D), "mask": (J,), "reconstruction": img}
        for path, doc, shapes in (
            (cls_path, "CapsNet classifier, routing unrolled", cls_shapes),
            (dec_path, "CapsNet reconstruction decoder", dec_shapes),
        ):
            proto = onnx.load(str(path))
            _pin_shapes(proto, shapes)
            proto.doc_string = doc
            onnx.helper.set_model_props(proto, meta)
            onnx.checker.check_model(proto, full_check=True)
            onnx.save(proto, str(path))
        classifier = onnx.load(str(cls_path))
        flow = graph_control_flow(classifier)
        if flow:
            raise ExportError(f"the classifier holds control flow {flow}: routing must be unrolled")
        _check_weights(classifier, onnx.load(str(dec_path)), model)
        parity = _check_parity(model, cls_path, dec_path, images, batches)
        report = {
            "parity_max_abs_diff": parity,
            "parity_batches": list(batches),
            "metadata": meta,
            "exporter": "torch.export",
            "torch": torch.__version__,
            "checkpoint": source,
        }
        (Path(tmp) / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        output.mkdir(parents=True, exist_ok=True)
        for f in ("capsnet.onnx", "decoder.onnx", "export.json"):
            shutil.move(str(Path(tmp) / f), output / f)
    return report


def graph_control_flow(proto: onnx.ModelProto) -> list[str]:
    """The Loop, Scan and If nodes of the graph and of its model-local functions (a nested one sits
    inside one of them): an exported classifier holds none."""
    nodes = [*proto.graph.node, *(n for f in proto.functions for n in f.node)]
    return sorted(n.op_type for n in nodes if n.op_type in {"Loop", "Scan", "If"})


def _check_weights(classifier: onnx.ModelProto, decoder: onnx.ModelProto, model: CapsNet) -> None:
    """Every parameter is stored under its own name (`model.<name>` in the classifier, the decoder's
    as they are), as `train.weights_from_export` reads them back, and DigitCaps' W just once: a layout
    of it folded into the file would be one more copy."""
    stored = {i.name: tuple(i.dims) for i in (*classifier.graph.initializer, *decoder.graph.initializer)}
    wanted = {
        (k if k.startswith("decoder.") else f"model.{k}"): tuple(v.shape) for k, v in model.named_parameters()
    }
    wrong = {k: (stored.get(k), shape) for k, shape in wanted.items() if stored.get(k) != shape}
    if wrong:
        raise ExportError(f"parameters not stored under their names, (stored, expected) shape: {wrong}")
    size = model.digits.W.numel()
    copies = sorted(i.name for i in classifier.graph.initializer if int(np.prod(i.dims)) == size)
    if copies != ["model.digits.W"]:
        raise ExportError(f"DigitCaps' W is stored as {copies}, not once as model.digits.W")


def export_directory(
    checkpoint: Path,
    output: Path,
    *,
    name: str,
    card: bool,
    train_command: str | None,
    hardware: str | None,
    fp16: bool,
    triton: Path | None,
) -> dict[str, Any]:
    """`capsnet export`: `export`, then the model card (`train_command` and `hardware` for it where the
    checkpoint lacks them), the fp16 variant and a Triton repository as asked; a summary of each.
    ExportError when the export itself fails (a checkpoint it cannot read included)."""
    from capsnet.model_export.card import write_card

    try:
        report = export(checkpoint, output, name=name)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    summary: dict[str, Any] = {"output": str(output), "parity_max_abs_diff": report["parity_max_abs_diff"]}
    if card:
        state = load_checkpoint(checkpoint)
        command = train_command or state.get("command") or "unknown"
        machine = hardware or state.get("hardware") or "unknown"
        written = write_card(output, state, report["metadata"], command=command, hardware=machine)
        summary["onnx_test_accuracy"] = written["evaluation"]["test_accuracy"]
    if fp16:
        from capsnet.model_export.fp16 import write_fp16

        summary["fp16"] = str(write_fp16(output))
    if triton is not None:
        from capsnet.model_export.triton import write_repository

        summary["triton"] = write_repository(output, triton)
    return summary
