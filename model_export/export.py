"""Export a trained CapsNet to ONNX: `capsnet.onnx` (routing unrolled r times) and `decoder.onnx`.

Exporters. The decoder always goes through torch.export (`torch.onnx.export(..., dynamo=True)`, which
needs onnxscript, in the `train` extra), the exporter PyTorch supports. The classifier can go through
either (`exporter=`, `capsnet export --exporter`); the default is still the deprecated TorchScript
tracer (`dynamo=False`). On the graph that formed the votes û it ran faster at B = 1 (torch.export's
graph 0.93-0.99x, 2-core AMD EPYC). On the current graph (routing without the votes, see
capsules.route_without_votes) torch.export's ran 1.03x and 1.02x at B = 1 and 32 on 2 threads, 1.02x
and 1.01x on 1 (one alternating run, same CPU, 2026-12-01), within noise. The shipped file, the Triton
config and the docs are at the tracer's opset 17; switching the default would re-export the shipped
model for no measured gain.

The tracer runs without constant folding: routing reads DigitCaps' W in three layouts, and folded each
would be one more 5.9 MB initializer in the file (27.2 -> 39.0 MB); onnxruntime folds them when it
loads the graph, and the file keeps W once under its parameter's name (which `train.weights_from_export`
relies on). torch.export's optimizer leaves tensors that large alone.

Either way routing is a Python `for` over an int r, so each recorded routing holds exactly r copies
of the iteration and no Loop/Scan can appear (checked below); dim 0 is a dynamic `batch` axis, and
parity is checked at several batch sizes after export, on both sides of SMALL_BATCH.

Two routings, one file. The classifier is recorded twice from the same weights, once per formulation
(model.FORMULATIONS), and the two are joined (`by_batch_size`): the convolutions once, then one If on
the batch size whose branches hold the routings. Up to SMALL_BATCH images it forms the votes û once and
routes them (`capsules.route`); above, it routes without them (`capsules.route_without_votes`), which
reads W five times, 5.9 MB each, and so costs ~0.3-0.9 ms more per run at B = 1 while saving ~7 % at
B >= 16 (capsules.route_without_votes' docstring has the side-by-side figures). That If is the only
control flow in the graph. torch.export's lowest opset is 18 (its
converter down to 17 fails on ReduceSum's axes input); the tracer's graph stays at opset 17. Each
file's `opset` metadata says its own.

The export is verified before anything is written to its destination: checker (full_check), then
onnxruntime (CPU) against PyTorch on real test images for several batch sizes; any output off by more
than the tolerance aborts the export.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from model_export.config import CapsNetConfig
from model_export.data import file_sha256, get_spec, load_split
from model_export.fp16 import graphs
from model_export.model import FORMULATIONS, CapsNet
from model_export.train import build_model, load_checkpoint

log = logging.getLogger(__name__)

OPSET = 18  # torch.export's lowest
TRACER_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
CLASSIFIER_EXPORTER = "torchscript"  # faster graph at B = 1, see the module docstring
PARITY_ATOL = 1e-5
PARITY_BATCHES = (1, 7, 64)  # both sides of SMALL_BATCH
# The most images the exported graph routes with the votes formed (see the module docstring). Images/s,
# the joined graph against the two it joins, alternating call by call, 2 threads, 2-core AMD EPYC
# (2026-12-01): votes-only 1.00 / without-votes-only 0.91 at B = 1, 1.00 / 0.90 at 2, 1.00 / 1.01 at 4,
# 1.00 / 1.035 at 8; the joined graph within 1 % of the faster one at every size from 1 to 32.
SMALL_BATCH = 4
# The issue's three outputs, plus the primary capsules' lengths that weight the routing summaries.
MODEL_OUTPUTS = ("probabilities", "poses", "coupling", "primary_activations")


class ExportError(RuntimeError):
    """The export could not be verified; nothing was written."""


class _ClassifierGraph(nn.Module):
    def __init__(self, model: CapsNet, formulation: str) -> None:
        super().__init__()
        self.model, self.formulation = model, formulation

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(self.model.run(image, self.formulation))  # type: ignore[return-value]


class _DecoderGraph(nn.Module):
    def __init__(self, model: CapsNet) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, poses: Tensor, mask: Tensor) -> Tensor:
        return self.decoder(poses, mask)


def to_onnx(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    exporter: str = "dynamo",
) -> int:
    """`module` -> ONNX at `path`, dim 0 of every input and output one dynamic `batch` axis; returns
    the graph's opset."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation, pytree and shape notes of both exporters
        if exporter == "torchscript":
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=TRACER_OPSET,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in (*inputs, *outputs)},
                # W is read in three layouts (capsules.route_without_votes): folded here, each would be
                # one more 5.9 MB initializer in the file; onnxruntime folds them when it loads the graph
                do_constant_folding=False,
            )
            return TRACER_OPSET
        batch = torch.export.Dim("batch")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes={name: {0: batch} for name in inputs},
            optimize=True,  # onnxscript's constant folding and dead-code removal
            verbose=False,
        )
    assert program is not None
    onnx.save(program.model_proto, str(path))
    return OPSET


def by_batch_size(small: onnx.ModelProto, large: onnx.ModelProto, most: int) -> onnx.ModelProto:
    """One classifier from two recordings of the same weights whose graphs differ after the PrimaryCaps
    convolution: the nodes up to that convolution once (`large`'s), then an If whose then-branch is the
    rest of `small` (the "votes" recording; batches of at most `most` images) and whose else-branch is
    the rest of `large` (the "without_votes" one).

    Inside a branch every value is renamed `<votes|without_votes>/...`; a branch reads the
    convolution's output and the initializers from the enclosing graph. Initializers both recordings hold
    under one name with the same bytes (the parameters) are kept once; any other of `small`'s is kept
    under its branch's prefix.
    """

    def cut(proto: onnx.ModelProto) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
        """(the nodes the last convolution depends on, itself included; all the others)"""
        convs = [n for n in proto.graph.node if n.op_type == "Conv"]
        if len(convs) != 2:
            raise ExportError(f"expected the classifier's two convolutions, found {len(convs)}")
        nodes = list(proto.graph.node)  # (held: protobuf makes new wrappers for nodes nobody holds)
        outer = upstream(nodes, convs[-1].output)
        ids = {id(n) for n in outer}
        return outer, [n for n in nodes if id(n) not in ids]

    outer, large_rest = cut(large)
    small_outer, small_rest = cut(small)
    if [n.op_type for n in small_outer] != [n.op_type for n in outer]:
        raise ExportError("the two recordings differ before the routing")
    large_inits = {i.name: i for i in large.graph.initializer}
    shared = {
        i.name
        for i in small.graph.initializer
        if i.name in large_inits and i.SerializeToString() == large_inits[i.name].SerializeToString()
    }

    def branch(
        proto: onnx.ModelProto,
        rest: list[onnx.NodeProto],
        own_outer: list[onnx.NodeProto],
        own_inits: list[onnx.TensorProto],
        tag: str,
    ) -> tuple[onnx.GraphProto, list[onnx.TensorProto]]:
        """`rest` as a branch named `tag`, and `own_inits` (initializers only this recording holds)
        renamed for it."""
        # The routing reads the PrimaryCaps convolution's output and nothing else before it: in the
        # int8 file any other read would keep a tensor in fp32 for it (quantize.py).
        before = {o for n in own_outer for o in n.output}
        read = {x for n in rest for x in n.input} & before
        if read != {own_outer[-1].output[0]}:
            raise ExportError(
                f"the {tag} routing reads {sorted(read)} from before it, not just the convolution"
            )
        names = {own_outer[-1].output[0]: outer[-1].output[0]}  # this recording's convolution -> the kept one
        names.update({i.name: f"{tag}/{i.name}" for i in own_inits})
        names.update({o: f"{tag}/{o}" for n in rest for o in n.output})
        nodes = []
        for n in rest:
            node = onnx.NodeProto()
            node.CopyFrom(n)
            node.input[:] = [names.get(x, x) for x in n.input]  # image, initializers, "" (omitted)
            node.output[:] = [names[x] for x in n.output]
            node.name = f"{tag}/{n.name}"
            nodes.append(node)
        outputs = [_renamed(o, names[o.name]) for o in proto.graph.output]
        renamed = [_renamed(i, names[i.name]) for i in own_inits]
        return onnx.helper.make_graph(nodes, tag, [], outputs), renamed

    small_own = [i for i in small.graph.initializer if i.name not in shared]
    then_branch, small_inits = branch(small, small_rest, small_outer, small_own, FORMULATIONS[0])
    else_branch, _ = branch(large, large_rest, outer, [], FORMULATIONS[1])
    image = large.graph.input[0].name
    switch = [
        onnx.helper.make_node("Shape", [image], ["batch_size"], start=0, end=1),
        onnx.helper.make_node(
            "Constant",
            [],
            ["small_batch"],
            value=onnx.helper.make_tensor("most", onnx.TensorProto.INT64, [1], [most]),
        ),
        onnx.helper.make_node("LessOrEqual", ["batch_size", "small_batch"], ["is_small_1"]),
        onnx.helper.make_node("Squeeze", ["is_small_1"], ["is_small"]),
        onnx.helper.make_node(
            "If",
            ["is_small"],
            [o.name for o in large.graph.output],
            name="routing_by_batch_size",
            then_branch=then_branch,
            else_branch=else_branch,
        ),
    ]
    graph = onnx.helper.make_graph(
        [*outer, *switch],
        large.graph.name,
        list(large.graph.input),
        list(large.graph.output),
        initializer=[*large.graph.initializer, *small_inits],
    )
    joined = onnx.helper.make_model(
        graph, opset_imports=list(large.opset_import), ir_version=large.ir_version
    )
    joined.producer_name, joined.producer_version = large.producer_name, large.producer_version
    return joined


def upstream(nodes: Iterable[onnx.NodeProto], names: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes, in their order, that the values `names` depend on (the nodes making them included).
    Reads inside a node's subgraphs are not followed."""
    nodes = list(nodes)
    made_by = {o: n for n in nodes for o in n.output}
    needed: set[int] = set()
    todo = [made_by[x] for x in names if x in made_by]
    while todo:
        node = todo.pop()
        if id(node) not in needed:
            needed.add(id(node))
            todo += [made_by[x] for x in node.input if x in made_by]
    return [n for n in nodes if id(n) in needed]


def _renamed(message: Any, name: str) -> Any:
    """A copy of a named ONNX message (a ValueInfoProto, a TensorProto) under `name`."""
    copy = type(message)()
    copy.CopyFrom(message)
    copy.name = name
    return copy


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
        "opset": str(OPSET),  # each file gets its own graph's opset at export
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
            worst[name] = max(worst[name], float(np.abs(r - g).max()))
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
    exporter: str = CLASSIFIER_EXPORTER,
) -> dict[str, Any]:
    """Export `checkpoint` into directory `output` (capsnet.onnx, decoder.onnx, export.json).
    `exporter`: the classifier's ("torchscript" or "dynamo"); the decoder's is always "dynamo".

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
    report = export_model(model, output, meta, images, batches, source=str(checkpoint), exporter=exporter)
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
    exporter: str = CLASSIFIER_EXPORTER,
) -> dict[str, Any]:
    """The export of `model` (weights already loaded) with metadata `meta`, verified, into `output`.

    `export` builds the model and metadata from a checkpoint; a shipped model can be re-exported from
    its own files (`train.weights_from_export` and its metadata) with the same call.
    """
    model = model.eval()
    cfg = model.config
    images = np.ascontiguousarray(images, dtype=np.float32)
    if not min(batches) <= SMALL_BATCH < max(batches):
        raise ValueError(f"parity batches {batches} must test both routings: at most {SMALL_BATCH} and more")
    with tempfile.TemporaryDirectory() as tmp:
        cls_path, dec_path = Path(tmp) / "capsnet.onnx", Path(tmp) / "decoder.onnx"
        example = torch.from_numpy(images[:2])
        recorded = []
        for formulation in FORMULATIONS:  # (votes, without_votes): the If's then and else branches
            path = Path(tmp) / f"{formulation}.onnx"
            opset = to_onnx(
                _ClassifierGraph(model, formulation),
                (example,),
                path,
                ["image"],
                list(MODEL_OUTPUTS),
                exporter,
            )
            recorded.append(onnx.load(str(path)))
        onnx.save(by_batch_size(recorded[0], recorded[1], SMALL_BATCH), str(cls_path))
        opsets = {cls_path: opset}
        poses = torch.zeros(2, cfg.num_classes, cfg.digit_dim)
        mask = torch.zeros(2, cfg.num_classes)
        opsets[dec_path] = to_onnx(
            _DecoderGraph(model), (poses, mask), dec_path, ["poses", "mask"], ["reconstruction"], "dynamo"
        )
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
            (
                cls_path,
                f"CapsNet classifier, routing unrolled; votes formed up to {SMALL_BATCH} images",
                cls_shapes,
            ),
            (dec_path, "CapsNet reconstruction decoder", dec_shapes),
        ):
            proto = onnx.load(str(path))
            _pin_shapes(proto, shapes)
            proto.doc_string = doc
            onnx.helper.set_model_props(proto, {**meta, "opset": str(opsets[path])})
            onnx.checker.check_model(proto, full_check=True)
            onnx.save(proto, str(path))
        flow = graph_control_flow(onnx.load(str(cls_path)))
        if flow != ["If"]:
            raise ExportError(f"the graph holds control flow {flow}: only the If on the batch size may be")
        parity = _check_parity(model, cls_path, dec_path, images, batches)
        report = {
            "parity_max_abs_diff": parity,
            "parity_batches": list(batches),
            "metadata": {**meta, "opset": str(opsets[cls_path])},
            "exporters": {"capsnet.onnx": exporter, "decoder.onnx": "dynamo"},
            "checkpoint": source,
        }
        (Path(tmp) / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        output.mkdir(parents=True, exist_ok=True)
        for f in ("capsnet.onnx", "decoder.onnx", "export.json"):
            shutil.move(str(Path(tmp) / f), output / f)
    return report


def graph_control_flow(proto: onnx.ModelProto) -> list[str]:
    """Every Loop, Scan and If, in the graph and in its subgraphs (`<subgraph>/<op>`): an exported
    classifier holds just ["If"], its switch on the batch size, each routing unrolled inside it."""
    return sorted(
        n.op_type if g is proto.graph else f"{g.name}/{n.op_type}"
        for g in graphs(proto.graph)
        for n in g.node
        if n.op_type in {"Loop", "Scan", "If"}
    )


def switch_threshold(proto: onnx.ModelProto) -> int:
    """The most images the classifier routes with the votes formed (its If's `small_batch` constant)."""
    (most,) = (n for n in proto.graph.node if n.op_type == "Constant" and n.output[0] == "small_batch")
    return int(onnx.numpy_helper.to_array(most.attribute[0].t).reshape(-1)[0])


def routing_branches(proto: onnx.ModelProto) -> dict[str, onnx.GraphProto]:
    """The exported classifier's two routings by formulation: the then- and else-branch of its If."""
    (switch,) = (n for n in proto.graph.node if n.op_type == "If")
    attrs = {a.name: a.g for a in switch.attribute}
    return {FORMULATIONS[0]: attrs["then_branch"], FORMULATIONS[1]: attrs["else_branch"]}


def run(args: argparse.Namespace) -> None:
    from model_export.card import write_card

    try:
        report = export(
            args.checkpoint,
            args.output,
            name=args.name,
            exporter=getattr(args, "exporter", CLASSIFIER_EXPORTER),
        )
    except (ExportError, ValueError) as exc:
        raise SystemExit(f"export failed: {exc}") from None
    summary: dict[str, Any] = {
        "output": str(args.output),
        "parity_max_abs_diff": report["parity_max_abs_diff"],
    }
    if args.card:
        state = load_checkpoint(args.checkpoint)
        command = args.train_command or state.get("command") or "unknown"
        hardware = args.hardware or state.get("hardware") or "unknown"
        card = write_card(args.output, state, report["metadata"], command=command, hardware=hardware)
        summary["onnx_test_accuracy"] = card["evaluation"]["test_accuracy"]
    if getattr(args, "fp16", False):
        from model_export.fp16 import write_fp16

        summary["fp16"] = str(write_fp16(args.output))
    if getattr(args, "triton", None) is not None:
        from model_export.triton import write_repository

        summary["triton"] = write_repository(args.output, args.triton)
    print(json.dumps(summary))
