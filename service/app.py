"""The FastAPI application: app factory, lifespan, input parsing and routes.

Routes only translate between HTTP and the domain (preprocess, engine); errors are JSON with a
human `detail` and the right status, never a stack trace.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine import Batcher, BatchStats, Engine, EngineClosedError, QueueFullError
from service.preprocess import PreprocessError, preprocess_bytes, validate_array
from service.render import routing_heatmap
from service.schemas import (
    ErrorResponse,
    Health,
    ImagesRequest,
    Metadata,
    PerturbResponse,
    PredictResponse,
    ReconstructRequest,
    ReconstructResponse,
    RoutingTraceResponse,
    error_responses,
)
from service.settings import Settings, get_settings
from service.v2 import router as v2_router
from service.web import OPEN_EXACT, OPEN_PREFIXES, add_web_page

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/", "application/octet-stream")
Preprocess = Literal["mnist", "none"]


class APIError(Exception):
    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code, self.detail, self.headers = status_code, detail, headers


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "capsnet_requests_total",
            "HTTP requests",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "capsnet_request_seconds",
            "HTTP request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch_size = Histogram(
            "capsnet_batch_images",
            "images per inference batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "capsnet_queue_seconds",
            "time a request waited for its batch",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
        )
        self.inference_time = Histogram(
            "capsnet_inference_seconds",
            "onnxruntime time per batch",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.queue_depth = Gauge(
            "capsnet_queue_images", "images waiting or in inference", registry=self.registry
        )
        self.rejected = Counter(
            "capsnet_rejected_total", "requests refused because the queue was full", registry=self.registry
        )

    def observe_batch(self, images: int, queue_seconds: list[float], inference_seconds: float) -> None:
        self.batch_size.observe(images)
        self.inference_time.observe(inference_seconds)
        for q in queue_seconds:
            self.queue_time.observe(q)


def error_body(path: str, detail: str) -> dict[str, str]:
    """Errors answered before any route runs: {"error"} on the Open Inference Protocol's paths, as it
    says, {"detail"} everywhere else."""
    return {"error": detail} if path == "/v2" or path.startswith("/v2/") else {"detail": detail}


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware overhead) counting requests per route and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: Callable[[], set[str]]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # the matched route's template (/v2/models/{name}/infer): a label per route, never per URL;
            # answered before routing (401, 503 busy): the path when it is a route's, else "other"
            route = getattr(scope.get("route"), "path", None)
            path = route or (scope["path"] if scope["path"] in self.paths() else "other")
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


class APIKeyMiddleware:
    """Bearer-token check before any route runs; constant-time comparison; open paths configurable
    (`open_paths` by prefix, `open_exact` by the whole path)."""

    def __init__(
        self, app: ASGIApp, key: str, open_paths: tuple[str, ...], open_exact: tuple[str, ...] = ()
    ) -> None:
        self.app, self.key, self.open_paths, self.open_exact = app, key.encode(), open_paths, open_exact

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.open_exact or path.startswith(self.open_paths):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        detail = "missing or wrong API key: send `Authorization: Bearer <key>`"
        response = json_response(error_body(path, detail), 401, {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class AdmissionMiddleware:
    """At most `limit` POST requests inside the app at once; the next one gets 503 + Retry-After before
    its body is read. The batcher's queue bounds the images waiting for the model; this bounds what
    waits in front of it (bodies being read and decoded) when the CPU itself is the bottleneck."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            detail = (
                f"the server is busy: {self.in_flight} requests in progress (limit {self.limit}); "
                "retry shortly"
            )
            body = error_body(scope["path"], detail)
            await json_response(body, 503, {"Retry-After": "1"})(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class State:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.metrics = Metrics()


def get_state(request: Request) -> State:
    return request.app.state.capsnet  # type: ignore[no-any-return]


StateDep = Annotated[State, Depends(get_state)]


def get_engine(state: StateDep) -> Engine:
    if not state.ready or state.engine is None:
        raise APIError(503, "the model is not loaded yet", {"Retry-After": "1"})
    return state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


async def warm_up(state: State) -> None:
    assert state.engine is not None
    seconds = await asyncio.to_thread(state.engine.warm_up, state.settings.max_batch_size)
    state.ready = True
    log.info("warm-up done in %.3f s; ready", seconds)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: State = app.state.capsnet
    s = state.settings
    state.engine = await asyncio.to_thread(Engine.from_settings, s)
    state.batcher = Batcher(
        state.engine, s.max_batch_size, s.max_wait_ms, s.queue_size, BatchStats(state.metrics.observe_batch)
    )
    state.batcher.start()
    warm = asyncio.create_task(warm_up(state))
    try:
        yield
    finally:
        state.ready = False
        warm.cancel()
        await state.batcher.close()


# ---------------------------------------------------------------------------------------------------------
# Input: multipart `file` / `files`, a raw image body, or JSON {"images": [...]}


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise APIError(413, f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # let request.form() parse what we already read
    return body


INLINE_DECODE_BYTES = 4096  # a 28x28 PNG is about 300 bytes


async def read_images(request: Request, settings: Settings, preprocess: Preprocess) -> np.ndarray:
    """The request's images as float32 (k, 1, 28, 28), or an APIError."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, settings.max_upload_bytes)
    if ctype == "multipart/form-data":
        blobs = await _multipart_blobs(request, settings)
        arrays = [await _decode(b, preprocess, settings) for b in blobs]
    elif ctype.startswith(IMAGE_TYPES):
        arrays = [await _decode(body, preprocess, settings)]
    elif ctype == "application/json" or ctype.endswith("+json"):
        arrays = _json_arrays(body, settings)
    else:
        raise APIError(
            415,
            f"unsupported Content-Type {ctype or '(none)'!r}: send multipart/form-data (field `file` or "
            '`files`), an image body (image/png, image/jpeg, ...) or application/json {"images": [...]}',
        )
    return np.stack(arrays)[:, None].astype(np.float32, copy=False)


async def _multipart_blobs(request: Request, settings: Settings) -> list[bytes]:
    try:
        form = await request.form(max_files=settings.max_images, max_fields=settings.max_images)
    except StarletteHTTPException as exc:  # python-multipart / starlette limits and parse errors
        status = 413 if "Too many" in str(exc.detail) else 400
        raise APIError(status, f"multipart body rejected: {exc.detail}") from None
    except Exception as exc:
        raise APIError(400, f"malformed multipart body: {type(exc).__name__}") from None
    try:
        parts = form.getlist("file") + form.getlist("files")
        uploads = [p for p in parts if isinstance(p, UploadFile)]
        if len(uploads) != len(parts):
            raise APIError(422, "the `file`/`files` fields must be file uploads, not text")
        if not uploads:
            raise APIError(422, "multipart body has no `file` or `files` field")
        if len(uploads) > settings.max_images:
            raise APIError(413, f"{len(uploads)} images in one request; the limit is {settings.max_images}")
        return [await u.read() for u in uploads]
    finally:
        await form.close()


async def _decode(data: bytes, preprocess: Preprocess, settings: Settings) -> np.ndarray:
    try:
        if preprocess == "none" and len(data) <= INLINE_DECODE_BYTES:
            # A small body already in MNIST form decodes in tens of microseconds, less than the hop to a
            # worker thread costs (+10 % requests/s at concurrency 32 on 2 cores, bench/bench.py); the
            # header's size is checked before any pixel is decoded, so nothing big decodes here.
            return preprocess_bytes(data, mode=preprocess, max_pixels=settings.max_image_pixels)
        return await run_in_threadpool(
            preprocess_bytes, data, mode=preprocess, max_pixels=settings.max_image_pixels
        )
    except PreprocessError as exc:
        raise APIError(exc.status_code, exc.detail) from None


def _json_arrays(body: bytes, settings: Settings) -> list[np.ndarray]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise APIError(422, f"invalid JSON: {exc.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise APIError(422, 'JSON body must be an object {"images": [28x28 arrays of floats in [0, 1]]}')
    images = doc["images"]
    if not images:
        raise APIError(422, "`images` is empty")
    if len(images) > settings.max_images:
        raise APIError(413, f"{len(images)} images in one request; the limit is {settings.max_images}")
    out = []
    for k, img in enumerate(images):
        try:
            out.append(validate_array(img))
        except PreprocessError as exc:
            raise APIError(exc.status_code, f"images[{k}]: {exc.detail}") from None
    return out


def busy(state: State, why: str) -> APIError:
    """The 503 for a full queue, counted: refused before reading the body, or when submitting."""
    state.metrics.rejected.inc()
    return APIError(503, f"the server is busy: {why}; retry shortly", {"Retry-After": "1"})


async def read_request_images(request: Request, state: State, preprocess: Preprocess) -> np.ndarray:
    assert state.batcher is not None
    if state.batcher.pending >= state.settings.queue_size:  # refuse before paying for reading + decoding
        waiting, limit = state.batcher.pending, state.settings.queue_size
        raise busy(state, f"{waiting} images are waiting (limit {limit})")
    with state.batcher.arriving():
        return await read_images(request, state.settings, preprocess)


def _is_json(request: Request) -> bool:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return ctype == "application/json" or ctype.endswith("+json")


async def _poses_from_json(request: Request, state: State, classes: int, dim: int) -> np.ndarray | None:
    """`{"poses": [classes x 16]}` -> float32 array; None when the JSON holds images instead."""
    body = await read_body(request, state.settings.max_upload_bytes)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise APIError(422, f"invalid JSON: {exc.msg}") from None
    if not (isinstance(doc, dict) and "poses" in doc):
        return None
    raw = doc["poses"]

    def finite(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= 10

    rows_ok = isinstance(raw, list) and len(raw) == classes
    ok = rows_ok and all(isinstance(row, list) and len(row) == dim and all(map(finite, row)) for row in raw)
    if not ok:
        raise APIError(422, f"`poses` must be {classes} rows of {dim} finite numbers in [-10, 10]")
    return np.asarray(raw, dtype=np.float32)


def png_bytes(image01: np.ndarray, scale: int = 1) -> bytes:
    """A [0, 1] grayscale array as PNG (white digit on black, like MNIST), nearest-neighbour upscaled."""
    pixels = np.clip(np.rint(image01 * 255.0), 0, 255).astype(np.uint8)
    if scale > 1:
        pixels = np.kron(pixels, np.ones((scale, scale), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


async def request_poses(request: Request, state: State, engine: Engine, preprocess: Preprocess,
                        class_index: int | None) -> tuple[np.ndarray, int]:  # fmt: skip
    """The poses (J, D) to decode, from `{"poses": ...}` JSON or from one image, and the class k."""
    if engine.decoder is None:
        raise APIError(503, "this model has no decoder.onnx")
    J = len(engine.info.labels)
    D = next(int(o["shape"][-1]) for o in engine.info.outputs if o["name"] == "poses")
    poses = await _poses_from_json(request, state, J, D) if _is_json(request) else None
    if poses is None:
        images = await read_request_images(request, state, preprocess)
        if len(images) != 1:
            raise APIError(422, f"this endpoint takes exactly one image, got {len(images)}")
        poses = (await infer(state, images))["poses"][0]
    k = choose_class(np.linalg.norm(poses, axis=-1), class_index)
    return np.ascontiguousarray(poses, dtype=np.float32), k


def choose_class(lengths: np.ndarray, class_index: int | None) -> int:
    """The caller's class if it exists, else the longest capsule (the prediction)."""
    if class_index is None:
        return int(lengths.argmax())
    if class_index >= len(lengths):
        raise APIError(422, f"class_index must be below {len(lengths)}")
    return class_index


def wants_png(request: Request, format: str | None) -> bool:
    return format == "png" or (format is None and "image/png" in request.headers.get("accept", ""))


def tile(grid: np.ndarray, gap: int = 1) -> np.ndarray:
    """(rows, cols, H, W) -> one image with `gap` pixels of mid-grey between the tiles."""
    rows, cols, H, W = grid.shape
    out = np.full((rows * (H + gap) - gap, cols * (W + gap) - gap), 0.5, np.float32)
    for r in range(rows):
        for c in range(cols):
            out[r * (H + gap) : r * (H + gap) + H, c * (W + gap) : c * (W + gap) + W] = grid[r, c]
    return out


async def infer(state: State, images: np.ndarray, coupling: bool = False) -> dict[str, np.ndarray]:
    assert state.batcher is not None
    try:
        return await asyncio.wait_for(
            state.batcher.submit(images, coupling), state.settings.request_timeout_s
        )
    except QueueFullError as exc:
        raise busy(state, str(exc)) from None
    except EngineClosedError as exc:
        raise APIError(503, str(exc), {"Retry-After": "5"}) from None
    except TimeoutError:
        raise APIError(504, f"inference took longer than {state.settings.request_timeout_s} s") from None


def prediction_items(engine: Engine, out: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    probs, poses = out["probabilities"], out["poses"]
    best = probs.argmax(axis=1)
    labels = engine.info.labels
    return [
        {
            "class_index": int(c),
            "label": labels[c],
            "probability": probs[i, c],
            "probabilities": probs[i],
            "poses": poses[i],
        }
        for i, c in enumerate(best)
    ]


def routing_summary(coupling: np.ndarray, activations: np.ndarray) -> list[dict[str, Any]]:
    """Per iteration: activation-weighted coupling mass per class and the entropy of the c_i."""
    a = activations / max(float(activations.sum()), 1e-12)  # (N,)
    entropy = -(coupling * np.log(np.clip(coupling, 1e-12, None))).sum(axis=-1)  # (r, N)
    return [
        {
            "iteration": k + 1,
            "class_mass": a @ coupling[k],
            "mean_entropy": float(entropy[k].mean()),
            "weighted_entropy": float(entropy[k] @ a),
        }
        for k in range(coupling.shape[0])
    ]


def aggregate_coupling(coupling: np.ndarray, types: int, grid: list[int], how: str) -> np.ndarray:
    """(r, N, J) -> unchanged, (r, types, J) or (r, rows, cols, J), averaging the other axis."""
    r, _, J = coupling.shape
    by_cell = coupling.reshape(r, types, grid[0], grid[1], J)  # N is (type, row, col) ordered
    if how == "type":
        return np.asarray(by_cell.mean(axis=(2, 3)))
    if how == "position":
        return np.asarray(by_cell.mean(axis=1))
    return coupling


# ---------------------------------------------------------------------------------------------------------

ERRORS = error_responses(
    ErrorResponse,
    {
        400: "corrupt, truncated or empty image, malformed body",
        413: "body, image (pixels) or image count over the limit",
        415: "unsupported Content-Type or image format",
        422: "wrong JSON shape or values (NaN, out of [0, 1]), bad query",
        503: "model not ready, or queue full (see Retry-After)",
        504: "inference timed out",
    },
)

IMAGE_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "one image"},
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "several images, answered in order",
                        },
                    },
                    "anyOf": [{"required": ["file"]}, {"required": ["files"]}],
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": ImagesRequest.model_json_schema()},
        },
    }
}

RECONSTRUCT_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            **IMAGE_BODY_DOC["requestBody"]["content"],
            "application/json": {"schema": {"oneOf": [ImagesRequest.model_json_schema(),
                                                      ReconstructRequest.model_json_schema()]}},
        },
    }
}  # fmt: skip

ClassQ = Annotated[
    int | None, Query(ge=0, description="class whose pose is decoded; default: the predicted one")
]
FormatQ = Annotated[Literal["json", "png"] | None, Query(description="default: png if Accept asks for it")]
ScaleQ = Annotated[int, Query(ge=1, le=16, description="PNG pixels per image pixel")]

PreprocessQ = Annotated[
    Literal["mnist", "none"],
    Query(
        description="`mnist`: bring a photo/scan to MNIST form; `none`: the image already is 28x28 MNIST-like"
    ),
]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="CapsNet inference service",
        version="0.1.0",
        description="Capsule Network (Sabour, Frosst & Hinton 2017, arXiv 1710.09829) served with "
        "onnxruntime: class probabilities as capsule lengths, 16-D poses and the routing coupling "
        "coefficients.",
        lifespan=lifespan,
        responses=ERRORS,
    )
    state = State(settings)
    app.state.capsnet = state
    paths = {getattr(r, "path", "") for r in app.router.routes}
    app.add_middleware(AdmissionMiddleware, limit=settings.max_in_flight)  # innermost: after the key check
    if settings.api_key is not None:
        open_paths: tuple[str, ...] = ("/docs", "/openapi.json", "/redoc")
        open_paths += ("/health/", "/v2/health/") if settings.open_health else ()
        open_paths += ("/metrics",) if settings.open_metrics else ()
        open_paths += OPEN_PREFIXES  # the web page holds no data; it sends the key on every API call
        app.add_middleware(APIKeyMiddleware, key=settings.api_key.get_secret_value(), open_paths=open_paths,
                           open_exact=OPEN_EXACT)  # fmt: skip
    if settings.cors_origins.strip():
        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Accept"])  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, paths=lambda: paths)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return json_response({"detail": exc.detail}, exc.status_code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return json_response({"detail": str(exc.detail)}, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        msgs = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return json_response({"detail": "; ".join(msgs) or "invalid request"}, 422)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return json_response({"detail": "internal server error"}, 500)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        openapi_extra=IMAGE_BODY_DOC,
        summary="Classify one or more images",
    )
    async def predict(
        request: Request, state: StateDep, engine: EngineDep, preprocess: PreprocessQ = "mnist"
    ) -> Response:
        images = await read_request_images(request, state, preprocess)
        out = await infer(state, images)
        info = engine.info
        return json_response(
            {
                "model": {"name": info.name, "version": info.version},
                "predictions": prediction_items(engine, out),
            }
        )

    @app.post(
        "/routing-trace",
        response_model=RoutingTraceResponse,
        openapi_extra=IMAGE_BODY_DOC,
        summary="The coupling coefficients c_ij of every routing iteration for one image",
    )
    async def routing_trace(
        request: Request,
        state: StateDep,
        engine: EngineDep,
        preprocess: PreprocessQ = "mnist",
        iterations: Annotated[
            Literal["all", "last"], Query(description="every iteration or only the last")
        ] = "all",
        format: Annotated[Literal["json", "png"], Query(description="png: coupling heatmaps")] = "json",
        class_index: ClassQ = None,
        weighted: Annotated[bool, Query(description="png: weight c_ij by the activation |u_i|")] = False,
        aggregate: Annotated[
            Literal["none", "type", "position"],
            Query(description="average the coupling over positions (`type`) or types (`position`)"),
        ] = "none",
    ) -> Response:
        images = await read_request_images(request, state, preprocess)
        if len(images) != 1:
            raise APIError(422, f"routing-trace takes exactly one image, got {len(images)}")
        out = await infer(state, images, coupling=True)
        info = engine.info
        coupling, activations = out["coupling"][0], out["primary_activations"][0]  # (r, N, J), (N,)
        summary = routing_summary(coupling, activations)
        if format == "png":
            k = choose_class(out["probabilities"][0], class_index)
            values = coupling[:, :, k] * (activations if weighted else 1.0)  # (r, N)
            what = "c_ij x |u_i|" if weighted else "c_ij"
            titles = [f"iter {s['iteration']}: mass {s['class_mass'][k]:.4f}, H {s['mean_entropy']:.4f}"
                      for s in summary]  # fmt: skip
            rows, cols = info.primary_grid
            legend = f"{what} to class {info.labels[k]}; {info.primary_types} capsule types x {rows}x{cols}"
            png, _ = await run_in_threadpool(routing_heatmap, values, info.primary_grid[0], titles, legend)
            return Response(png, media_type="image/png")
        which = list(range(1, info.routing_iterations + 1))
        if iterations == "last":
            coupling, which = coupling[-1:], which[-1:]
        item = prediction_items(engine, out)[0]
        item.update(
            {
                "model": {"name": info.name, "version": info.version},
                "iterations": info.routing_iterations,
                "classes": info.labels,
                "primary_capsules": {
                    "count": info.num_primary,
                    "types": info.primary_types,
                    "grid": info.primary_grid,
                    "order": ["type", "row", "col"],
                },
                "coupling_iterations": which,
                "aggregate": aggregate,
                "coupling": np.ascontiguousarray(
                    aggregate_coupling(coupling, info.primary_types, info.primary_grid, aggregate)
                ),
                "primary_activations": activations,
                "summary": summary,
            }
        )
        return json_response(item)

    @app.post("/reconstruct", response_model=ReconstructResponse, openapi_extra=RECONSTRUCT_BODY_DOC,
              responses={200: {"content": {"image/png": {}}}},
              summary="The decoder's reconstruction from the pose of one class")  # fmt: skip
    async def reconstruct(
        request: Request,
        state: StateDep,
        engine: EngineDep,
        preprocess: PreprocessQ = "mnist",
        class_index: ClassQ = None,
        format: FormatQ = None,
        scale: ScaleQ = 1,
    ) -> Response:
        poses, k = await request_poses(request, state, engine, preprocess, class_index)
        J = len(engine.info.labels)
        mask = np.eye(J, dtype=np.float32)[[k]]
        recon = (await run_in_threadpool(engine.reconstruct, poses[None], mask))[0, 0]
        if wants_png(request, format):
            return Response(png_bytes(recon, scale), media_type="image/png")
        return json_response(
            {
                "class_index": k,
                "label": engine.info.labels[k],
                "length": np.linalg.norm(poses[k]),
                "poses": poses,
                "reconstruction": recon,
            }
        )

    @app.post(
        "/perturb",
        response_model=PerturbResponse,
        openapi_extra=RECONSTRUCT_BODY_DOC,
        responses={200: {"content": {"image/png": {}}}},
        summary="Pose-dimension sweeps (paper Fig. 4): reconstructions with one dimension tweaked",
    )
    async def perturb(
        request: Request,
        state: StateDep,
        engine: EngineDep,
        preprocess: PreprocessQ = "mnist",
        class_index: ClassQ = None,
        dims: Annotated[str | None, Query(description="comma list of pose dimensions; default: all")] = None,
        low: Annotated[float, Query(ge=-5, le=5)] = -0.25,
        high: Annotated[float, Query(ge=-5, le=5)] = 0.25,
        step: Annotated[float, Query(gt=0, le=10)] = 0.05,
        format: FormatQ = None,
        scale: ScaleQ = 1,
    ) -> Response:
        poses, k = await request_poses(request, state, engine, preprocess, class_index)
        J, D = poses.shape
        try:
            chosen = list(range(D)) if dims is None else [int(d) for d in dims.split(",")]
        except ValueError:
            raise APIError(422, f"dims must be a comma list of integers in [0, {D})") from None
        if not chosen or any(not 0 <= d < D for d in chosen) or len(set(chosen)) != len(chosen):
            raise APIError(422, f"dims must be distinct integers in [0, {D})")
        if high < low:
            raise APIError(422, "high must be >= low")
        n = int(np.floor((high - low) / step + 1e-6)) + 1
        if n > 41:
            raise APIError(422, f"{n} sweep values; at most 41 (raise step or narrow the range)")
        values = (low + step * np.arange(n)).astype(np.float32)
        batch = np.repeat(poses[None], len(chosen) * n, axis=0)  # (dims*values, J, D)
        for a, d in enumerate(chosen):
            batch[a * n : (a + 1) * n, k, d] += values
        mask = np.zeros((len(batch), J), np.float32)
        mask[:, k] = 1.0
        recon = await run_in_threadpool(engine.reconstruct, batch, mask)
        grid = recon[:, 0].reshape(len(chosen), n, *recon.shape[2:])  # (dims, values, H, W)
        if wants_png(request, format):
            return Response(png_bytes(tile(grid), scale), media_type="image/png")
        return json_response({"class_index": k, "label": engine.info.labels[k], "dims": chosen,
                              "values": values, "reconstructions": grid})  # fmt: skip

    @app.get("/health/live", response_model=Health)
    async def live() -> Response:
        return json_response({"status": "alive"})

    @app.get("/health/ready", response_model=Health, responses={503: {"model": Health}})
    async def ready(state: StateDep) -> Response:
        if state.ready:
            return json_response({"status": "ready"})
        return json_response(
            {"status": "starting", "detail": "model loading or warming up"}, 503, {"Retry-After": "1"}
        )

    @app.get("/metadata", response_model=Metadata)
    async def metadata(state: StateDep, engine: EngineDep) -> Response:
        info = engine.info
        s = state.settings
        return json_response(
            {
                "name": info.name,
                "version": info.version,
                "labels": info.labels,
                "routing_iterations": info.routing_iterations,
                "primary_capsules": {
                    "count": info.num_primary,
                    "types": info.primary_types,
                    "grid": info.primary_grid,
                    "order": ["type", "row", "col"],
                },
                "inputs": info.inputs,
                "outputs": info.outputs,
                "providers": engine.providers,
                "decoder": engine.decoder is not None,
                "model_card": info.card,
                "onnx_metadata": info.metadata,
                "batching": {
                    "max_batch_size": s.max_batch_size,
                    "max_wait_ms": s.max_wait_ms,
                    "queue_size": s.queue_size,
                },
            }
        )

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics(state: StateDep) -> Response:
        if state.batcher is not None:
            state.metrics.queue_depth.set(state.batcher.pending)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(v2_router)  # Open Inference Protocol; its lifespan runs inside ours
    add_web_page(app)
    paths.update(getattr(r, "path", "") for r in app.router.routes)
    return app
