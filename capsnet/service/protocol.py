"""The Open Inference Protocol's tensors (KServe v2, the same over REST and gRPC): the models'
signatures, inference requests parsed and validated against them, answers encoded. numpy in, numpy
out; no web framework here.

The protocol: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ with
Triton's binary tensor data extension (raw little-endian tensors after the JSON header, whose length
is the `Inference-Header-Content-Length` header). Names, datatypes and shapes are read from each
ONNX file.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from capsnet.service.engine import Engine, EngineError
from capsnet.service.errors import APIError
from capsnet.service.preprocess import numbers_only

# onnxruntime type -> (protocol datatype, little-endian numpy dtype of the binary form)
DATATYPES = {
    "tensor(float)": ("FP32", "<f4"),
    "tensor(double)": ("FP64", "<f8"),
    "tensor(float16)": ("FP16", "<f2"),
    "tensor(int64)": ("INT64", "<i8"),
    "tensor(int32)": ("INT32", "<i4"),
}
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # protocol datatype, e.g. FP32
    dtype: str  # numpy dtype of the binary form, e.g. <f4
    shape: list[int]  # -1 for a dynamic axis (the batch)

    @classmethod
    def from_ort(cls, io: dict[str, Any]) -> TensorSpec:
        if io["type"] not in DATATYPES:
            raise EngineError(f"{io['name']}: onnxruntime type {io['type']} has no v2 datatype here")
        datatype, dtype = DATATYPES[io["type"]]
        shape = [d if isinstance(d, int) and d >= 0 else -1 for d in io["shape"]]
        return cls(io["name"], datatype, dtype, shape)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


@dataclass(frozen=True)
class Signature:
    """A model as the protocol sees it: name, version, typed inputs and outputs."""

    name: str
    version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @classmethod
    def of(cls, engine: Engine) -> Signature:
        info = engine.info
        return cls(
            info.name,
            info.version,
            [TensorSpec.from_ort(t) for t in info.inputs],
            [TensorSpec.from_ort(t) for t in info.outputs],
        )

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]  # (name, as binary), in the order asked for


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A gzip or deflate request body (tritonclient's request compression), at most `limit` bytes."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.strip().lower())
    if wbits is None:
        raise APIError(400, f"unsupported Content-Encoding {encoding!r}: use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise APIError(400, f"corrupt {encoding} body: {exc}") from None
    if len(out) > limit:
        raise APIError(413, f"the decompressed body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise APIError(400, f"truncated {encoding} body")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary data) per the binary tensor data extension."""
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
        raise APIError(
            400, f"{HEADER_LENGTH} must be an integer in [1, {len(body)}] (the body's length), "
            f"got {header_length!r}"
        )  # fmt: skip
    n = int(header_length)
    return body[:n], body[n:]


def _flatten(data: list[Any], out: list[float], name: str, depth: int) -> None:
    """Row-major values of a flat or nested JSON list; numbers only (no bool, string or null)."""
    if numbers_only(data):  # a flat list, or the innermost rows: no item to look at one by one
        out.extend(data)
        return
    for v in data:
        if isinstance(v, list):
            if depth == 0:
                raise APIError(400, f"input {name!r}: data is nested deeper than the tensor's axes")
            _flatten(v, out, name, depth - 1)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(v)
        else:
            raise APIError(
                400, f"input {name!r}: data holds {type(v).__name__} {str(v)[:20]!r}, not a number"
            )


def _check_shape(spec: TensorSpec, shape: Any, max_batch: int) -> list[int]:
    ok = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    if not ok or len(shape) != len(spec.shape):
        raise APIError(400, f"input {spec.name!r}: shape must be a list of {len(spec.shape)} integers "
                      f"matching {spec.shape}, got {shape!r}")  # fmt: skip
    for d, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if got != want and not (want == -1 and got >= 1):
            raise APIError(400, f"input {spec.name!r}: shape {shape} does not match {spec.shape} (axis {d})")
    if shape[0] > max_batch:
        raise APIError(413, f"input {spec.name!r}: batch of {shape[0]}; the limit is {max_batch}")
    return [int(d) for d in shape]


def _check_values(name: str, x: np.ndarray) -> None:
    """Finite and in [0, 1], like the JSON images of /predict (the model's input contract)."""
    bad = ~((x >= 0) & (x <= 1))  # NaN compares False
    if bad.any():
        where = np.unravel_index(int(np.argmax(bad)), x.shape)
        v = float(x[where])
        what = "not a finite number" if not math.isfinite(v) else "out of range"
        index = ",".join(str(int(i)) for i in where)
        raise APIError(400, f"input {name!r}: value at [{index}] is {what}: {v!r}; expected [0, 1]")


def parse_infer_request(header: bytes, binary: bytes, model: Signature, max_batch: int) -> InferRequest:
    """Validate a v2 inference request against the model's inputs and outputs; APIError(4xx) if wrong."""
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"invalid JSON in the request header: {exc.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise APIError(400, 'the request must be a JSON object with an "inputs" list')
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise APIError(400, '"id" must be a string')
    params = doc.get("parameters") or {}
    binary_default = params.get("binary_data_output", False) if isinstance(params, dict) else None
    if not isinstance(binary_default, bool):
        raise APIError(400, '"parameters" must be an object, and its "binary_data_output" a boolean')

    specs = {t.name: t for t in model.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for k, item in enumerate(doc["inputs"]):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(item, dict) or name not in specs:
            raise APIError(400, f"inputs[{k}]: model {model.name!r} has the inputs {sorted(specs)}, "
                          f"got {name!r}")  # fmt: skip
        if name in inputs:
            raise APIError(400, f"input {name!r} is given twice")
        spec = specs[name]
        if item.get("datatype") != spec.datatype:
            raise APIError(
                400, f"input {name!r}: datatype must be {spec.datatype}, got {item.get('datatype')!r}"
            )
        shape = _check_shape(spec, item.get("shape"), max_batch)
        count = math.prod(shape)
        iparams = item.get("parameters") or {}
        size = iparams.get("binary_data_size") if isinstance(iparams, dict) else None
        if size is not None:
            if "data" in item:
                raise APIError(400, f"input {name!r}: give either data or binary_data_size, not both")
            want = count * np.dtype(spec.dtype).itemsize
            if not isinstance(size, int) or isinstance(size, bool) or size != want:
                raise APIError(400, f"input {name!r}: binary_data_size must be {want} bytes for shape "
                              f"{shape} of {spec.datatype}, got {size!r}")  # fmt: skip
            if offset + size > len(binary):
                raise APIError(400, f"input {name!r}: {size} bytes of binary data announced, "
                              f"{len(binary) - offset} present")  # fmt: skip
            x = np.frombuffer(binary, spec.dtype, count, offset).reshape(shape).copy()
            offset += size
        else:
            data = item.get("data")
            if not isinstance(data, list):
                raise APIError(400, f"input {name!r}: no data (a JSON list) and no binary_data_size")
            flat: list[float] = []
            _flatten(data, flat, name, len(shape) - 1)
            if len(flat) != count:
                raise APIError(400, f"input {name!r}: shape {shape} needs {count} values, got {len(flat)}")
            x = np.asarray(flat, dtype=np.float64).reshape(shape)
        _check_values(name, x)  # JSON values in float64, before the cast can turn huge ones into inf
        inputs[name] = x.astype(spec.dtype)
    missing = sorted(set(specs) - set(inputs))
    if missing:
        raise APIError(400, f"missing inputs {missing} for model {model.name!r}")
    if offset != len(binary):
        raise APIError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return InferRequest(request_id, inputs, _requested_outputs(doc.get("outputs"), model, binary_default))


def _requested_outputs(raw: Any, model: Signature, binary_default: bool) -> list[tuple[str, bool]]:
    names = [t.name for t in model.outputs]
    if raw is None:
        return [(n, binary_default) for n in names]
    if not isinstance(raw, list) or not raw:
        raise APIError(400, '"outputs" must be a non-empty list of {"name": ...} objects')
    out: list[tuple[str, bool]] = []
    for k, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if name not in names:
            raise APIError(400, f"outputs[{k}]: model {model.name!r} has the outputs {names}, got {name!r}")
        if any(n == name for n, _ in out):
            raise APIError(400, f"output {name!r} is asked for twice")
        oparams = item.get("parameters") or {}
        if not isinstance(oparams, dict) or set(oparams) - {"binary_data"}:
            raise APIError(400, f"output {name!r}: the only output parameter served is binary_data")
        as_binary = oparams.get("binary_data", binary_default)
        if not isinstance(as_binary, bool):
            raise APIError(400, f"output {name!r}: binary_data must be a boolean")
        out.append((name, as_binary))
    return out


def encode_infer_response(
    model: Signature, req: InferRequest, results: dict[str, np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """JSON header (+ binary tensors after it, with the header's length in a response header)."""
    specs = {t.name: t for t in model.outputs}
    outputs, blobs = [], []
    for name, as_binary in req.outputs:
        spec = specs[name]
        x = np.ascontiguousarray(results[name], dtype=spec.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": spec.datatype, "shape": list(x.shape)}
        if as_binary:
            blobs.append(x.tobytes())
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = x.ravel()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if req.id is not None:
        doc["id"] = req.id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


# ---------------------------------------------------------------------------------------------------------
