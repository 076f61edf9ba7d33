"""The fp16 variant of an exported CapsNet, for GPUs.

The convolutions and matrix products, where nearly all the time goes, run in half precision; squash,
softmax and the routing's sums stay in fp32, because squash divides by the square root of a squared
length that fp16 can underflow to zero. The graph's inputs and outputs keep their fp32 types, so the
service and its clients see the same API. onnx only, no torch: it rewrites a file `capsnet export`
wrote.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HALF_OPS = ("Conv", "MatMul")
FP16_FILE = "capsnet-fp16.onnx"  # the name the service loads under CAPSNET_PRECISION=fp16


def to_fp16(model: onnx.ModelProto, ops: tuple[str, ...] = HALF_OPS) -> onnx.ModelProto:
    """A copy of `model` whose `ops` nodes compute in fp16, with Cast nodes at their borders.

    Weights used only by such nodes are stored in fp16 (half the bytes); a tensor is cast once however
    many half-precision nodes read it, and a half-precision result feeds the next one without a round
    trip through fp32. `model` must be one static graph, as `capsnet export` writes it: nodes inside
    subgraphs (If, Loop, Scan) would read values this rewrite renames, so it refuses them.
    """
    graph_attrs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    flow = [n.op_type for n in model.graph.node if any(a.type in graph_attrs for a in n.attribute)]
    if flow:
        raise ValueError(f"the graph holds subgraphs (in {flow}); re-export it as one static graph")
    out = copy.deepcopy(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    half_of: dict[str, str] = {}  # fp32 tensor -> its fp16 twin
    nodes: list[onnx.NodeProto] = []

    def half(name: str) -> str:
        if name in half_of:
            return half_of[name]
        init = inits.get(name)
        if (
            init is not None
            and init.data_type == TensorProto.FLOAT
            and all(n.op_type in ops for n in consumers[name])
        ):
            arr = numpy_helper.to_array(init).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(arr, name))
            half_of[name] = name
            return name
        half_of[name] = f"{name}_fp16"
        nodes.append(helper.make_node("Cast", [name], [half_of[name]], to=TensorProto.FLOAT16))
        return half_of[name]

    for node in graph.node:
        if node.op_type not in ops:
            nodes.append(node)
            continue
        node.input[:] = [half(name) if name else name for name in node.input]
        outputs = list(node.output)
        node.output[:] = [f"{name}_fp16" for name in outputs]
        nodes.append(node)
        for name in outputs:  # fp32 copies under the old names, for the nodes that read them
            half_of[name] = f"{name}_fp16"
            nodes.append(helper.make_node("Cast", [half_of[name]], [name], to=TensorProto.FLOAT))
    # Drop fp32 casts nobody reads (a half result read only by half nodes).
    read = {name for n in nodes for name in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if not (n.op_type == "Cast" and n.output[0] not in read)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.ClearField("value_info")
    onnx.checker.check_model(out)
    return out


def write_fp16(model_dir: Path) -> Path:
    """Write `capsnet-fp16.onnx` beside `capsnet.onnx` (its metadata says the precision) and return it."""
    model = onnx.load(str(Path(model_dir) / "capsnet.onnx"))
    half = to_fp16(model)
    meta = {p.key: p for p in half.metadata_props}
    if "precision" in meta:
        meta["precision"].value = "fp16"
    else:
        half.metadata_props.append(onnx.StringStringEntryProto(key="precision", value="fp16"))
    path = Path(model_dir) / FP16_FILE
    onnx.save(half, str(path))
    return path
