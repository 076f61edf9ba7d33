"""The Open Inference Protocol's tensors in their protobuf form: a `ModelInferRequest` validated into
arrays, outputs encoded into a `ModelInferResponse`. The rules and messages are capsnet.service.protocol's
(shapes, the batch limit, values in [0, 1]); only the transport differs: `raw_input_contents` (one
little-endian buffer per input, in order) or typed `contents` (fp32_contents, ...) in, and
`raw_output_contents` out, as Triton answers and tritonclient reads.

The messages are tritonclient's generated ones (module `service_pb2`, package `inference`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from capsnet.service.errors import APIError
from capsnet.service.protocol import Signature, TensorSpec, _check_shape, _check_values

# datatype -> the field of InferTensorContents that carries it (FP16 has none: raw only)
CONTENTS = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
}

Message = Any  # a generated protobuf message (tritonclient ships no type information)


def parse_inputs(request: Message, model: Signature, max_batch: int) -> dict[str, np.ndarray]:
    """The request's inputs by name, checked against the model; APIError(4xx) when wrong."""
    specs = {t.name: t for t in model.inputs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise APIError(400, f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} "
                      "inputs: give one per input, in the order of the inputs")  # fmt: skip
    inputs: dict[str, np.ndarray] = {}
    for k, tensor in enumerate(request.inputs):
        name = tensor.name
        if name not in specs:
            raise APIError(400, f"inputs[{k}]: model {model.name!r} has the inputs {sorted(specs)}, "
                          f"got {name!r}")  # fmt: skip
        if name in inputs:
            raise APIError(400, f"input {name!r} is given twice")
        spec = specs[name]
        if tensor.datatype != spec.datatype:
            raise APIError(400, f"input {name!r}: datatype must be {spec.datatype}, got {tensor.datatype!r}")
        shape = _check_shape(spec, list(tensor.shape), max_batch)
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise APIError(400, f"input {name!r}: give raw_input_contents or contents, not both")
            want = count * np.dtype(spec.dtype).itemsize
            if len(raw[k]) != want:
                raise APIError(400, f"input {name!r}: raw_input_contents[{k}] holds {len(raw[k])} bytes; "
                              f"shape {shape} of {spec.datatype} needs {want}")  # fmt: skip
            x = np.frombuffer(raw[k], spec.dtype).reshape(shape)
        else:
            field = CONTENTS.get(spec.datatype)
            if field is None:
                raise APIError(400, f"input {name!r}: {spec.datatype} travels in raw_input_contents only")
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise APIError(400, f"input {name!r}: shape {shape} needs {count} values in "
                              f"contents.{field}, got {len(values)}")  # fmt: skip
            x = np.fromiter(values, spec.dtype, count).reshape(shape)
        _check_values(name, x)
        inputs[name] = x
    missing = sorted(set(specs) - set(inputs))
    if missing:
        raise APIError(400, f"missing inputs {missing} for model {model.name!r}")
    return inputs


def requested_outputs(request: Message, model: Signature) -> list[str]:
    """The outputs asked for, in their order; all of the model's when none is named."""
    names = [t.name for t in model.outputs]
    if not request.outputs:
        return names
    out: list[str] = []
    for k, item in enumerate(request.outputs):
        if item.name not in names:
            raise APIError(400, f"outputs[{k}]: model {model.name!r} has the outputs {names}, "
                          f"got {item.name!r}")  # fmt: skip
        if item.name in out:
            raise APIError(400, f"output {item.name!r} is asked for twice")
        extra = sorted(set(item.parameters) - {"binary_data"})  # binary_data: always, over gRPC
        if extra:
            raise APIError(400, f"output {item.name!r}: output parameters {extra} are not served")
        out.append(item.name)
    return out


def infer_response(
    model: Signature, request_id: str, names: list[str], results: dict[str, np.ndarray]
) -> Message:
    """The outputs asked for, each as one raw little-endian buffer in `raw_output_contents`."""
    specs = {t.name: t for t in model.outputs}
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request_id)
    for name in names:
        spec = specs[name]
        x = np.ascontiguousarray(results[name], dtype=spec.dtype)
        response.outputs.add(name=name, datatype=spec.datatype, shape=x.shape)
        response.raw_output_contents.append(x.tobytes())
    return response


def model_metadata(model: Signature) -> Message:
    def tensors(specs: list[TensorSpec]) -> list[Message]:
        return [pb.ModelMetadataResponse.TensorMetadata(**t.metadata()) for t in specs]

    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[model.version],
        platform="onnxruntime_onnx",
        inputs=tensors(model.inputs),
        outputs=tensors(model.outputs),
    )
