"""The gRPC server, on the HTTP service's event loop: the inference service, `grpc.health.v1.Health`
(SERVING once every model's warm-up ran, NOT_SERVING while draining) and server reflection (for
grpcurl). Started by the app's lifespan after the models are loaded, stopped before the batchers
close: new calls are refused, calls in flight finish (up to CAPSNET_REQUEST_TIMEOUT_S, which bounds
every inference anyway).

With CAPSNET_WORKERS > 1 every uvicorn worker process runs its own server on the same port: grpc then
binds with SO_REUSEPORT, so each worker's bind succeeds and the kernel spreads new connections over
the workers (an HTTP/2 connection, and so a channel, stays with one worker). With one worker the port
is bound without it, so a second server on a taken port fails at startup instead of sharing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from capsnet.service.oip_grpc.servicer import SERVICE, InferenceServicer
from capsnet.service.state import State

log = logging.getLogger(__name__)

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def address(host: str, port: int) -> str:
    host = host or "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def build(state: State, server_version: str) -> tuple[Any, Health]:
    """(grpc.aio.Server with every service added, its health servicer); not yet listening."""
    s = state.settings
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", s.grpc_max_message_bytes),
            ("grpc.max_send_message_length", s.grpc_max_message_bytes),
            # several workers share the port; one process alone must own it (a second one fails)
            ("grpc.so_reuseport", int(s.workers > 1)),
        ],
    )
    server.add_generic_rpc_handlers((InferenceServicer(state, server_version).handler(),))
    health_servicer = Health(state)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, HEALTH, reflection.SERVICE_NAME), server)
    return server, health_servicer


class Health(health.aio.HealthServicer):  # type: ignore[misc]  # grpcio-health-checking is untyped
    """grpc.health.v1, NOT_SERVING until every model is warmed up. A Check looks at the models itself,
    so it never lags behind /v2/health/ready; `_serving_once_ready` tells the Watch streams."""

    def __init__(self, state: State) -> None:
        super().__init__()
        self.state, self.warm = state, False

    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802  (the RPC's name)
        await self.update()
        return await super().Check(request, context)

    async def update(self) -> bool:
        """SERVING once every model is ready (ignored once draining began); whether it is."""
        if not self.warm and self.state.all_warm:
            self.warm = True
            for service in ("", SERVICE):
                await self.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.warm


async def _serving_once_ready(health_servicer: Health) -> None:
    while not await health_servicer.update():
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def serving(state: State, server_version: str) -> AsyncIterator[None]:
    """Serve gRPC while the block runs (nothing when CAPSNET_GRPC_PORT is 0); call inside
    `State.serving()`, whose models it answers from."""
    s = state.settings
    if s.grpc_port == 0:
        yield
        return
    server, health_servicer = build(state, server_version)
    where = address(s.grpc_host, s.grpc_port)
    try:
        server.add_insecure_port(where)
    except RuntimeError:
        raise RuntimeError(
            f"gRPC cannot listen on {where} (in use, or not an address here?); "
            "CAPSNET_GRPC_PORT=0 turns gRPC off"
        ) from None
    for service in ("", SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("gRPC (Open Inference Protocol, health, reflection) on %s", where)
    ready = asyncio.create_task(_serving_once_ready(health_servicer))
    try:
        yield
    finally:
        ready.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=s.request_timeout_s)
        log.info("gRPC server stopped")
