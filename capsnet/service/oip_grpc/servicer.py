"""`inference.GRPCInferenceService`: the six RPCs of the Open Inference Protocol over the same models
and batchers as REST (`State.infer`), so one batch can hold requests of both; and Triton's model
repository RPCs over the same repository (`State.load`, `State.unload`) as REST's /v2/repository.

Every RPC passes `_call`: the request ID (`x-request-id` metadata when valid, else a new one, as REST
keeps X-Request-ID; returned in the trailing metadata, on the call's log lines and its access line),
the keys (capsnet.service.auth: `authorization: Bearer <key>`, constant-time; the health RPCs stay open as
REST's /v2/health does unless CAPSNET_OPEN_HEALTH is off; RepositoryModelLoad and
RepositoryModelUnload are the management group: refused unless CAPSNET_MODEL_CONTROL=explicit, then
they need the admin key, not the API key), the domain's APIError turned into a gRPC status
with its message (and `retry-after` for UNAVAILABLE), and the metrics. The RPCs not listed here
(streaming, shared memory, statistics, trace and log settings) answer UNIMPLEMENTED, grpc's default.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import grpc
from tritonclient.grpc import service_pb2 as pb

from capsnet.service import logs
from capsnet.service.auth import ModelControl, bearer_matches, secret
from capsnet.service.errors import APIError
from capsnet.service.oip_grpc import tensors
from capsnet.service.oip_grpc.tensors import Message
from capsnet.service.state import ServedModel, State

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
REQUEST_ID = "x-request-id"
RETRY_AFTER = "retry-after"

# the HTTP status of an APIError -> its gRPC code
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # a batch over CAPSNET_MAX_IMAGES: a size, as a shape is
    422: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

Context = Any  # grpc.aio.ServicerContext (grpcio ships no type information)
Rpc = Callable[[Message, Context], Awaitable[Message]]
Group = Literal["open", "inference", "management"]  # who may call an RPC (capsnet.service.auth)


def _metadata(context: Context, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == key:
            value: str = item.value
            return value
    return None


class InferenceServicer:
    def __init__(self, state: State, server_version: str) -> None:
        self.state, self.server_version = state, server_version
        s = state.settings
        self.key, self.control = secret(s.api_key), ModelControl(s)
        self.open_health = s.open_health
        self.limit = s.max_in_flight  # ModelInfer calls in progress, as REST counts its POSTs

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's methods for `server.add_generic_rpc_handlers`."""
        health: Group = "open" if self.open_health else "inference"
        rpcs: dict[str, tuple[Rpc, Any, Group]] = {  # name: (method, request type, who may call it)
            "ServerLive": (self.server_live, pb.ServerLiveRequest, health),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, health),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, health),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, "inference"),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, "inference"),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, "inference"),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest, "inference"),
            "RepositoryModelLoad": (self.repository_load, pb.RepositoryModelLoadRequest, "management"),
            "RepositoryModelUnload": (self.repository_unload, pb.RepositoryModelUnloadRequest, "management"),
        }
        methods = {
            name: grpc.unary_unary_rpc_method_handler(
                self._call(name, rpc, group),
                request_deserializer=request_type.FromString,
                response_serializer=lambda message: message.SerializeToString(),
            )
            for name, (rpc, request_type, group) in rpcs.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _call(self, name: str, rpc: Rpc, group: Group) -> Callable[[Message, Context], Awaitable[Message]]:
        metrics = self.state.metrics

        async def call(request: Message, context: Context) -> Message:
            given = _metadata(context, REQUEST_ID) or ""
            valid = given.isascii() and logs.valid_request_id(given.encode())
            entry = logs.RequestLog(given if valid else logs.new_request_id(), "GRPC", f"/{SERVICE}/{name}")
            logs.current.set(entry)  # this call's task: its log lines and State.infer see it
            trailing: tuple[tuple[str, str], ...] = ((REQUEST_ID, entry.request_id),)
            code, sent = grpc.StatusCode.CANCELLED, 0  # unless the call ends otherwise (a client gone)
            try:
                try:
                    self._authorize(context, group)
                    response = await rpc(request, context)
                    code, sent = grpc.StatusCode.OK, response.ByteSize()
                    context.set_trailing_metadata(trailing)
                    return response
                except APIError as exc:
                    code, detail = CODES.get(exc.status_code, grpc.StatusCode.INTERNAL), exc.detail
                    retry = (exc.headers or {}).get("Retry-After")
                    trailing += ((RETRY_AFTER, retry),) if retry else ()
                    log.info("gRPC %s %s: %s", name, code.name, detail)
                except Exception:
                    log.exception("gRPC %s: unhandled error", name)
                    code, detail = grpc.StatusCode.INTERNAL, "internal server error"
                await context.abort(code, detail, trailing_metadata=trailing)
                raise AssertionError("unreachable: abort raises")  # pragma: no cover
            finally:
                metrics.grpc_requests.labels(name, code.name).inc()
                metrics.grpc_latency.labels(name).observe(time.perf_counter() - entry.started)
                logs.log_access(entry, entry.path, code.value[0], sent)  # status: the gRPC code

        return call

    def _authorize(self, context: Context, group: Group) -> None:
        authorization = _metadata(context, "authorization")
        if group == "management":  # the admin key, never the API key
            self.control.check(authorization, "send the metadata `authorization: Bearer <admin key>`")
        elif group == "inference" and self.key is not None and not bearer_matches(authorization, self.key):
            raise APIError(401, "missing or wrong API key: send the metadata `authorization: Bearer <key>`")

    def _model(self, name: str, version: str) -> ServedModel:
        return self.state.repository().get(name, version or None)

    # -- the RPCs ---------------------------------------------------------------------------------

    async def server_live(self, request: Message, context: Context) -> Message:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Message, context: Context) -> Message:
        return pb.ServerReadyResponse(ready=self.state.all_warm)

    async def model_ready(self, request: Message, context: Context) -> Message:
        return pb.ModelReadyResponse(ready=self._model(request.name, request.version).ready)

    async def server_metadata(self, request: Message, context: Context) -> Message:
        return pb.ServerMetadataResponse(name="capsnet-service", version=self.server_version, extensions=[])

    async def model_metadata(self, request: Message, context: Context) -> Message:
        return tensors.model_metadata(self._model(request.name, request.version).signature)

    async def model_infer(self, request: Message, context: Context) -> Message:
        state = self.state
        if state.infer_calls_in_flight >= self.limit:
            raise APIError(503, f"the server is busy: {state.infer_calls_in_flight} inference calls in "
                           f"progress (limit {self.limit}); retry shortly", {"Retry-After": "1"})  # fmt: skip
        state.infer_calls_in_flight += 1
        try:
            return await self._infer(request, context)
        finally:
            state.infer_calls_in_flight -= 1

    async def _infer(self, request: Message, context: Context) -> Message:
        model = self._model(request.model_name, request.model_version)
        if not model.ready:
            raise APIError(503, f"model {model.name!r} is loading or warming up", {"Retry-After": "1"})
        state = self.state
        state.admit(model)  # a full queue refuses before the request is validated
        with model.batcher.arriving():
            inputs = tensors.parse_inputs(request, model.signature, state.settings.max_images)
            names = tensors.requested_outputs(request, model.signature)
        (images,) = inputs.values()  # the engine's one input, `image` (Engine checks the file)
        results = await state.infer(model, images, "coupling" in names, self._timeout(context))
        return tensors.infer_response(model.signature, request.id, names, results)

    def _timeout(self, context: Context) -> float:
        """The batcher's timeout: what is left of the client's deadline, at most CAPSNET_REQUEST_TIMEOUT_S."""
        limit = self.state.settings.request_timeout_s
        remaining: float | None = context.time_remaining()
        if remaining is None:
            return limit
        if remaining <= 0:
            raise APIError(504, "the client's deadline passed before inference")
        return min(limit, remaining)

    # -- Triton's model repository extension

    async def repository_index(self, request: Message, context: Context) -> Message:
        entries = self.state.repository().index()
        if request.ready:
            entries = [e for e in entries if e["state"] == "READY"]
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries]
        )

    async def repository_load(self, request: Message, context: Context) -> Message:
        _no_overrides(request)
        await self.state.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(self, request: Message, context: Context) -> Message:
        _no_overrides(request)
        await self.state.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _no_overrides(request: Message) -> None:
    """A model is loaded from its directory as it is (REST's rule): no config or file parameters."""
    extra = sorted(set(request.parameters) - {"unload_dependents"})
    if extra:
        raise APIError(400, "a model is loaded from its directory as it is: no config or file overrides "
                       f"(got parameters {extra})")  # fmt: skip
