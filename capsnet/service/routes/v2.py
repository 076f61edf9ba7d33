"""Open Inference Protocol (KServe v2) REST endpoints over the same models and batchers as /predict.

Every model of the repository is served by name; errors are `{"error": "..."}`, as the protocol
says. The tensors' parsing and encoding are in capsnet.service.protocol (numpy, no FastAPI).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Scope

from capsnet.service.errors import APIError, json_response
from capsnet.service.inputs import read_body
from capsnet.service.middleware import CLIENT_GONE, FastRoute
from capsnet.service.protocol import (
    EXTENSIONS,
    HEADER_LENGTH,
    decompress,
    encode_infer_response,
    parse_infer_request,
    split_body,
)
from capsnet.service.routes import StateDep
from capsnet.service.schemas import (
    INFER_BODY_DOC,
    MANAGEMENT_ERRORS,
    V2_ERRORS,
    InferResponse,
    ModelMetadataResponse,
    RepositoryIndexEntry,
    ServerMetadataResponse,
)
from capsnet.service.state import Repository, ServedModel, State

log = logging.getLogger(__name__)


def error_response(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return json_response({"error": message}, status_code, dict(headers) if headers else None)


class V2Route(APIRoute):
    """Answers every failure of a v2 route the protocol's way, `{"error": ...}`, not `{"detail": ...}`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as exc:
                return error_response(exc.status_code, exc.detail, exc.headers)
            except StarletteHTTPException as exc:
                return error_response(exc.status_code, str(exc.detail), exc.headers)
            except RequestValidationError as exc:
                return error_response(400, "; ".join(str(e.get("msg")) for e in exc.errors()))
            except ClientDisconnect:
                return Response(status_code=CLIENT_GONE)
            except Exception:
                log.exception("unhandled error in a v2 route")
                return error_response(500, "internal server error")

        return route


async def repository_dep(state: StateDep) -> Repository:
    return state.repository()


RepositoryDep = Annotated[Repository, Depends(repository_dep)]

router = APIRouter(
    prefix="/v2", tags=["Open Inference Protocol (v2)"], route_class=V2Route, responses=V2_ERRORS
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
    if waiting := repo.warming():
        raise APIError(503, f"models not ready yet: {waiting}", {"Retry-After": "1"})
    return Response(status_code=200)


@router.get("/models/{name}", response_model=ModelMetadataResponse, summary="Model metadata")
async def model_metadata(repo: RepositoryDep, name: str) -> Response:
    return json_response(repo.get(name).signature.metadata())


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadataResponse,
            summary="Model metadata (one version)")  # fmt: skip
async def model_version_metadata(repo: RepositoryDep, name: str, version: str) -> Response:
    return json_response(repo.get(name, version).signature.metadata())


@router.get("/models/{name}/ready", summary="200 once the model is warmed up, 503 before",
            response_class=Response, responses=EMPTY_200)  # fmt: skip
async def model_ready(repo: RepositoryDep, name: str) -> Response:
    repo.get(name).check_ready()
    return Response(status_code=200)


@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness (one version)",
            response_class=Response, responses=EMPTY_200)  # fmt: skip
async def model_version_ready(repo: RepositoryDep, name: str, version: str) -> Response:
    repo.get(name, version).check_ready()
    return Response(status_code=200)


@router.post("/models/{name}/infer", response_model=InferResponse, openapi_extra=INFER_BODY_DOC,
             summary="Inference: `image` in, the outputs asked for out")  # fmt: skip
async def infer(request: Request, state: StateDep, repo: RepositoryDep, name: str) -> Response:
    return await answer(request, state, repo.get(name))


@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse,
             openapi_extra=INFER_BODY_DOC, summary="Inference (one version)")  # fmt: skip
async def infer_version(
    request: Request, state: StateDep, repo: RepositoryDep, name: str, version: str
) -> Response:
    return await answer(request, state, repo.get(name, version))


async def answer(request: Request, state: State, model: ServedModel) -> Response:
    model.check_ready()
    s = state.settings
    with model.batcher.arriving():
        body = await read_body(request, s.max_upload_bytes)
        body = decompress(body, request.headers.get("content-encoding"), s.max_upload_bytes)
        header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        req = parse_infer_request(header, binary, model.signature, s.max_images)
    (images,) = req.inputs.values()  # the engine's one input, `image` (Engine checks the file)
    coupling = any(n == "coupling" for n, _ in req.outputs)
    results = await state.infer(model, images, coupling)
    content, headers = encode_infer_response(model.signature, req, results)
    return Response(content, headers=headers)


# -- Triton's model repository extension: index, load (a reload when loaded) and unload. Load and
# unload are the management group: middleware.Guard refuses them unless CAPSNET_MODEL_CONTROL=explicit,
# then without the admin key (capsnet.service.auth), before they reach these handlers.


async def _repository_body(request: Request, state: State) -> dict[str, Any]:
    """The optional JSON body of a repository request; overrides of the model's files are refused."""
    body = await read_body(request, state.settings.max_upload_bytes)
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"invalid JSON: {exc.msg}") from None
    if not isinstance(doc, dict):
        raise APIError(400, "the body must be a JSON object")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise APIError(400, '"parameters" must be an object')
    if set(params) - {"unload_dependents"}:
        raise APIError(400, "a model is loaded from its directory as it is: no config or file overrides "
                       f"(got parameters {sorted(params)})")  # fmt: skip
    return doc


@router.post("/repository/index", response_model=list[RepositoryIndexEntry],
             summary="Every model directory the server knows: READY, or UNAVAILABLE and why")  # fmt: skip
async def repository_index(request: Request, state: StateDep, repo: RepositoryDep) -> Response:
    doc = await _repository_body(request, state)
    entries = repo.index()
    if doc.get("ready") is True:
        entries = [e for e in entries if e["state"] == "READY"]
    return json_response(entries)


@router.post("/repository/models/{name}/load", response_class=Response,
             responses=EMPTY_200 | MANAGEMENT_ERRORS,
             summary="Load the model from its directory again: the new files are warmed up beside the "
             "old ones, then swapped in; requests in flight finish on the old version")  # fmt: skip
async def repository_load(request: Request, state: StateDep, name: str) -> Response:
    await _repository_body(request, state)
    await state.load(name)
    return Response(status_code=200)


@router.post("/repository/models/{name}/unload", response_class=Response,
             responses=EMPTY_200 | MANAGEMENT_ERRORS,
             summary="Stop serving the model once its requests in flight are answered")  # fmt: skip
async def repository_unload(request: Request, state: StateDep, name: str) -> Response:
    await _repository_body(request, state)
    await state.unload(name)
    return Response(status_code=200)


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
async def not_found(request: Request, path: str) -> Response:
    raise APIError(404, f"no v2 endpoint {request.method} /v2/{path}")


# -- the fast lane: POST /v2/models/{name}/infer without a query string

INFER_PREFIX, INFER_SUFFIX = "/v2/models/", "/infer"


async def _fast_infer(request: Request, state: State) -> Response:
    name = request.scope["path"][len(INFER_PREFIX) : -len(INFER_SUFFIX)]
    return await answer(request, state, state.repository().get(name))


FAST_INFER: FastRoute = (_fast_infer, "/v2/models/{name}/infer")


def fast_route(scope: Scope) -> FastRoute | None:
    path: str = scope["path"]
    if not (path.startswith(INFER_PREFIX) and path.endswith(INFER_SUFFIX)) or scope["query_string"]:
        return None
    name = path[len(INFER_PREFIX) : -len(INFER_SUFFIX)]
    return FAST_INFER if name and "/" not in name else None
