"""Open Inference Protocol (KServe v2) REST endpoints over the same engines and batchers as /predict.

The protocol: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ with
Triton's binary tensor data extension (raw little-endian tensors after the JSON header, whose length
is the `Inference-Header-Content-Length` header). Errors are `{"error": "..."}`, as the protocol says.

Several models: `CAPSNET_MODEL_DIR` (the default, also behind /predict) plus `CAPSNET_MODEL_DIRS`,
each served under the `name` in its ONNX metadata, with an engine, a batcher and readiness of its own.
Names, datatypes and shapes are read from each ONNX file.
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine import Batcher, BatchStats, Engine, EngineClosedError, EngineError, QueueFullError
from service.schemas import error_responses
from service.settings import Settings

if TYPE_CHECKING:
    from service.app import State

log = logging.getLogger(__name__)

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


class V2Error(Exception):
    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.headers = status_code, message, headers


def error_response(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code, headers, "application/json")


def json_response(content: Any) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


class V2Route(APIRoute):
    """Answers every failure of a v2 route the protocol's way, `{"error": ...}`, not `{"detail": ...}`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except V2Error as exc:
                return error_response(exc.status_code, exc.message, exc.headers)
            except StarletteHTTPException as exc:
                return error_response(exc.status_code, str(exc.detail), exc.headers)
            except RequestValidationError as exc:
                return error_response(400, "; ".join(str(e.get("msg")) for e in exc.errors()))
            except Exception:
                log.exception("unhandled error in a v2 route")
                return error_response(500, "internal server error")

        return route


# ---------------------------------------------------------------------------------------------------------
# The models served


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


@dataclass
class ServedModel:
    """One model on the v2 paths. The default model's readiness is the app's (`is_ready`); the others
    are ready once their own warm-up ran (`warmed`)."""

    engine: Engine
    batcher: Batcher
    is_ready: Callable[[], bool] | None = None
    warmed: bool = False
    inputs: list[TensorSpec] = field(init=False)
    outputs: list[TensorSpec] = field(init=False)

    def __post_init__(self) -> None:
        self.inputs = [TensorSpec.from_ort(t) for t in self.engine.info.inputs]
        self.outputs = [TensorSpec.from_ort(t) for t in self.engine.info.outputs]

    @property
    def name(self) -> str:
        return self.engine.info.name

    @property
    def version(self) -> str:
        return self.engine.info.version

    @property
    def ready(self) -> bool:
        return self.is_ready() if self.is_ready is not None else self.warmed

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }


class Repository:
    """The models by name; the first one is the default (CAPSNET_MODEL_DIR)."""

    def __init__(self) -> None:
        self.models: dict[str, ServedModel] = {}

    def add(self, model: ServedModel) -> None:
        if model.name in self.models:
            raise EngineError(f"two model directories carry the model name {model.name!r}")
        self.models[model.name] = model

    def get(self, name: str, version: str | None = None) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise V2Error(404, f"unknown model {name!r}; this server has {sorted(self.models)}")
        if version is not None and version != model.version:
            raise V2Error(404, f"model {name!r} has no version {version!r}; it has [{model.version!r}]")
        return model


def extra_model_dirs(settings: Settings) -> list[Path]:
    """CAPSNET_MODEL_DIRS as paths, without the default model and without repeats."""
    seen = {settings.model_dir.resolve()}
    out = []
    for part in settings.model_dirs.split(","):
        if part.strip() and (path := Path(part.strip())).resolve() not in seen:
            seen.add(path.resolve())
            out.append(path)
    return out


async def _warm_up(model: ServedModel, max_batch: int) -> None:
    seconds = await asyncio.to_thread(model.engine.warm_up, max_batch)
    model.warmed = True
    log.info("%s: warm-up done in %.3f s; ready", model.name, seconds)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Runs inside the app's lifespan (FastAPI nests a router's): the default engine exists already."""
    state: State = app.state.capsnet
    s = state.settings
    assert state.engine is not None and state.batcher is not None
    repo = Repository()
    repo.add(ServedModel(state.engine, state.batcher, is_ready=lambda: state.ready))
    own: list[ServedModel] = []
    warm: list[asyncio.Task[None]] = []
    try:
        for directory in extra_model_dirs(s):
            engine = await asyncio.to_thread(Engine.from_settings, s, directory)
            stats = BatchStats(state.metrics.observe_batch)
            model = ServedModel(engine, Batcher(engine, s.max_batch_size, s.max_wait_ms, s.queue_size, stats))
            repo.add(model)
            own.append(model)
            model.batcher.start()
            warm.append(asyncio.create_task(_warm_up(model, s.max_batch_size)))
        app.state.v2_models = repo
        yield
    finally:
        app.state.v2_models = None
        for task in warm:
            task.cancel()
        for model in own:
            model.warmed = False
            await model.batcher.close()
        for task in warm:
            with suppress(asyncio.CancelledError):
                await task


def get_repository(request: Request) -> Repository:
    repo: Repository | None = getattr(request.app.state, "v2_models", None)
    if repo is None:
        raise V2Error(503, "the models are not loaded yet", {"Retry-After": "1"})
    return repo


RepositoryDep = Annotated[Repository, Depends(get_repository)]


# ---------------------------------------------------------------------------------------------------------
# Inference request and response (numpy in, numpy out; no FastAPI below this line until the routes)


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
        raise V2Error(400, f"unsupported Content-Encoding {encoding!r}: use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise V2Error(400, f"corrupt {encoding} body: {exc}") from None
    if len(out) > limit:
        raise V2Error(413, f"the decompressed body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise V2Error(400, f"truncated {encoding} body")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary data) per the binary tensor data extension."""
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
        raise V2Error(
            400, f"{HEADER_LENGTH} must be an integer in [1, {len(body)}] (the body's length), "
            f"got {header_length!r}"
        )  # fmt: skip
    n = int(header_length)
    return body[:n], body[n:]


def _flatten(data: list[Any], out: list[float], name: str, depth: int) -> None:
    """Row-major values of a flat or nested JSON list; numbers only (no bool, string or null)."""
    for v in data:
        if isinstance(v, list):
            if depth == 0:
                raise V2Error(400, f"input {name!r}: data is nested deeper than the tensor's axes")
            _flatten(v, out, name, depth - 1)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(v)
        else:
            raise V2Error(400, f"input {name!r}: data holds {type(v).__name__} {str(v)[:20]!r}, not a number")


def _check_shape(spec: TensorSpec, shape: Any, max_batch: int) -> list[int]:
    ok = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    if not ok or len(shape) != len(spec.shape):
        raise V2Error(400, f"input {spec.name!r}: shape must be a list of {len(spec.shape)} integers "
                      f"matching {spec.shape}, got {shape!r}")  # fmt: skip
    for d, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if got != want and not (want == -1 and got >= 1):
            raise V2Error(400, f"input {spec.name!r}: shape {shape} does not match {spec.shape} (axis {d})")
    if shape[0] > max_batch:
        raise V2Error(413, f"input {spec.name!r}: batch of {shape[0]}; the limit is {max_batch}")
    return [int(d) for d in shape]


def _check_values(name: str, x: np.ndarray) -> None:
    """Finite and in [0, 1], like the JSON images of /predict (the model's input contract)."""
    bad = ~((x >= 0) & (x <= 1))  # NaN compares False
    if bad.any():
        where = np.unravel_index(int(np.argmax(bad)), x.shape)
        v = float(x[where])
        what = "not a finite number" if not math.isfinite(v) else "out of range"
        index = ",".join(str(int(i)) for i in where)
        raise V2Error(400, f"input {name!r}: value at [{index}] is {what}: {v!r}; expected [0, 1]")


def parse_infer_request(header: bytes, binary: bytes, model: ServedModel, max_batch: int) -> InferRequest:
    """Validate a v2 inference request against the model's inputs and outputs; V2Error(4xx) if wrong."""
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise V2Error(400, f"invalid JSON in the request header: {exc.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise V2Error(400, 'the request must be a JSON object with an "inputs" list')
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2Error(400, '"id" must be a string')
    params = doc.get("parameters") or {}
    binary_default = params.get("binary_data_output", False) if isinstance(params, dict) else None
    if not isinstance(binary_default, bool):
        raise V2Error(400, '"parameters" must be an object, and its "binary_data_output" a boolean')

    specs = {t.name: t for t in model.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for k, item in enumerate(doc["inputs"]):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(item, dict) or name not in specs:
            raise V2Error(400, f"inputs[{k}]: model {model.name!r} has the inputs {sorted(specs)}, "
                          f"got {name!r}")  # fmt: skip
        if name in inputs:
            raise V2Error(400, f"input {name!r} is given twice")
        spec = specs[name]
        if item.get("datatype") != spec.datatype:
            raise V2Error(
                400, f"input {name!r}: datatype must be {spec.datatype}, got {item.get('datatype')!r}"
            )
        shape = _check_shape(spec, item.get("shape"), max_batch)
        count = math.prod(shape)
        iparams = item.get("parameters") or {}
        size = iparams.get("binary_data_size") if isinstance(iparams, dict) else None
        if size is not None:
            if "data" in item:
                raise V2Error(400, f"input {name!r}: give either data or binary_data_size, not both")
            want = count * np.dtype(spec.dtype).itemsize
            if not isinstance(size, int) or isinstance(size, bool) or size != want:
                raise V2Error(400, f"input {name!r}: binary_data_size must be {want} bytes for shape "
                              f"{shape} of {spec.datatype}, got {size!r}")  # fmt: skip
            if offset + size > len(binary):
                raise V2Error(400, f"input {name!r}: {size} bytes of binary data announced, "
                              f"{len(binary) - offset} present")  # fmt: skip
            x = np.frombuffer(binary, spec.dtype, count, offset).reshape(shape).copy()
            offset += size
        else:
            data = item.get("data")
            if not isinstance(data, list):
                raise V2Error(400, f"input {name!r}: no data (a JSON list) and no binary_data_size")
            flat: list[float] = []
            _flatten(data, flat, name, len(shape) - 1)
            if len(flat) != count:
                raise V2Error(400, f"input {name!r}: shape {shape} needs {count} values, got {len(flat)}")
            x = np.asarray(flat, dtype=np.float64).reshape(shape)
        _check_values(name, x)  # JSON values in float64, before the cast can turn huge ones into inf
        inputs[name] = x.astype(spec.dtype)
    missing = sorted(set(specs) - set(inputs))
    if missing:
        raise V2Error(400, f"missing inputs {missing} for model {model.name!r}")
    if offset != len(binary):
        raise V2Error(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return InferRequest(request_id, inputs, _requested_outputs(doc.get("outputs"), model, binary_default))


def _requested_outputs(raw: Any, model: ServedModel, binary_default: bool) -> list[tuple[str, bool]]:
    names = [t.name for t in model.outputs]
    if raw is None:
        return [(n, binary_default) for n in names]
    if not isinstance(raw, list) or not raw:
        raise V2Error(400, '"outputs" must be a non-empty list of {"name": ...} objects')
    out: list[tuple[str, bool]] = []
    for k, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if name not in names:
            raise V2Error(400, f"outputs[{k}]: model {model.name!r} has the outputs {names}, got {name!r}")
        if any(n == name for n, _ in out):
            raise V2Error(400, f"output {name!r} is asked for twice")
        oparams = item.get("parameters") or {}
        if not isinstance(oparams, dict) or set(oparams) - {"binary_data"}:
            raise V2Error(400, f"output {name!r}: the only output parameter served is binary_data")
        as_binary = oparams.get("binary_data", binary_default)
        if not isinstance(as_binary, bool):
            raise V2Error(400, f"output {name!r}: binary_data must be a boolean")
        out.append((name, as_binary))
    return out


def encode_infer_response(
    model: ServedModel, req: InferRequest, results: dict[str, np.ndarray]
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
# Schemas for the OpenAPI document (requests are parsed by hand: the binary extension is not JSON)


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="e.g. FP32")
    shape: list[int] = Field(description="-1 for the dynamic batch axis")


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferInput(BaseModel):
    name: str = Field(description="`image`")
    shape: list[int] = Field(description="[B, 1, 28, 28]")
    datatype: str = Field(description="FP32")
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_size": bytes} for binary data')
    data: list[Any] | None = Field(None, description="row-major values in [0, 1], flat or nested")


class RequestedOutput(BaseModel):
    name: str = Field(description="`probabilities`, `poses`, `coupling` or `primary_activations`")
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data": true} for binary data')


class InferRequestDoc(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_output": true}')
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = Field(None, description="default: every output")


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


class V2ErrorResponse(BaseModel):
    error: str


ERRORS = error_responses(
    V2ErrorResponse,
    {
        400: "malformed request: JSON, datatype, shape, data length or values (NaN, out of [0, 1])",
        404: "unknown model or version",
        413: "body or batch over the limit",
        503: "model not ready, or queue full (see Retry-After)",
        504: "inference timed out",
    },
)
INFER_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "JSON; or, with the `Inference-Header-Content-Length` header, that many bytes of "
        "JSON followed by the binary inputs",
        "content": {
            "application/json": {"schema": InferRequestDoc.model_json_schema()},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

# ---------------------------------------------------------------------------------------------------------
# Routes

router = APIRouter(
    prefix="/v2",
    tags=["Open Inference Protocol (v2)"],
    route_class=V2Route,
    lifespan=lifespan,
    responses=ERRORS,
)


@router.get("", response_model=ServerMetadataResponse, summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    return json_response(
        {"name": "capsnet-service", "version": request.app.version, "extensions": EXTENSIONS}
    )


EMPTY_200: dict[int | str, dict[str, Any]] = {200: {"description": "yes (empty body, as Triton answers)"}}


@router.get("/health/live", summary="The server answers", response_class=Response, responses=EMPTY_200)
async def server_live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", summary="200 once every model is loaded and warmed up, 503 before",
            response_class=Response, responses=EMPTY_200)  # fmt: skip
async def server_ready(repo: RepositoryDep) -> Response:
    waiting = [name for name, m in repo.models.items() if not m.ready]
    if waiting:
        raise V2Error(503, f"models not ready yet: {waiting}", {"Retry-After": "1"})
    return Response(status_code=200)


@router.get("/models/{name}", response_model=ModelMetadataResponse, summary="Model metadata")
async def model_metadata(repo: RepositoryDep, name: str) -> Response:
    return json_response(repo.get(name).metadata())


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadataResponse,
            summary="Model metadata (one version)")  # fmt: skip
async def model_version_metadata(repo: RepositoryDep, name: str, version: str) -> Response:
    return json_response(repo.get(name, version).metadata())


def _ready(model: ServedModel) -> Response:
    if not model.ready:
        raise V2Error(503, f"model {model.name!r} is loading or warming up", {"Retry-After": "1"})
    return Response(status_code=200)


@router.get("/models/{name}/ready", summary="200 once the model is warmed up, 503 before",
            response_class=Response, responses=EMPTY_200)  # fmt: skip
async def model_ready(repo: RepositoryDep, name: str) -> Response:
    return _ready(repo.get(name))


@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness (one version)",
            response_class=Response, responses=EMPTY_200)  # fmt: skip
async def model_version_ready(repo: RepositoryDep, name: str, version: str) -> Response:
    return _ready(repo.get(name, version))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise V2Error(413, f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise V2Error(413, f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/models/{name}/infer", response_model=InferResponse, openapi_extra=INFER_BODY_DOC,
             summary="Inference: `image` in, the outputs asked for out")  # fmt: skip
async def infer(request: Request, repo: RepositoryDep, name: str) -> Response:
    return await _infer(request, repo.get(name))


@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse,
             openapi_extra=INFER_BODY_DOC, summary="Inference (one version)")  # fmt: skip
async def infer_version(request: Request, repo: RepositoryDep, name: str, version: str) -> Response:
    return await _infer(request, repo.get(name, version))


async def _infer(request: Request, model: ServedModel) -> Response:
    if not model.ready:
        raise V2Error(503, f"model {model.name!r} is loading or warming up", {"Retry-After": "1"})
    state: State = request.app.state.capsnet
    s = state.settings
    with model.batcher.arriving():
        body = await _read_body(request, s.max_upload_bytes)
        body = decompress(body, request.headers.get("content-encoding"), s.max_upload_bytes)
        header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        req = parse_infer_request(header, binary, model, s.max_images)
    (images,) = req.inputs.values()  # the engine's one input, `image` (Engine checks the file)
    coupling = any(n == "coupling" for n, _ in req.outputs)
    try:
        results = await asyncio.wait_for(model.batcher.submit(images, coupling), s.request_timeout_s)
    except QueueFullError as exc:
        state.metrics.rejected.inc()
        raise V2Error(503, f"the server is busy: {exc}; retry shortly", {"Retry-After": "1"}) from None
    except EngineClosedError as exc:
        raise V2Error(503, str(exc), {"Retry-After": "5"}) from None
    except TimeoutError:
        raise V2Error(504, f"inference took longer than {s.request_timeout_s} s") from None
    content, headers = encode_infer_response(model, req, results)
    return Response(content, headers=headers)


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
async def not_found(request: Request, path: str) -> Response:
    raise V2Error(404, f"no v2 endpoint {request.method} /v2/{path}")
