"""The FastAPI application, assembled: settings -> state -> middleware -> routers.

A request travels: middleware.py (accounting, CORS, API key, admission, the fast lane) -> a route in
routes/ -> inputs.py (body -> arrays; preprocess.py for images) -> state.py (the model's batcher,
batcher.py, running engine.py's onnxruntime session) -> the route's JSON answer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Scope

from capsnet.service import middleware, web
from capsnet.service.errors import APIError, json_response
from capsnet.service.oip_grpc import server as grpc_server
from capsnet.service.routes import explain, health, predict, v2
from capsnet.service.schemas import REST_ERRORS
from capsnet.service.settings import Settings, get_settings
from capsnet.service.state import State
from capsnet.service.web import OPEN_EXACT, OPEN_PREFIXES

log = logging.getLogger(__name__)


class ServiceApp(FastAPI):
    """FastAPI with our middleware outside its own stack (`wrap`), so that the fast lane skips it."""

    def __init__(self, wrap: Callable[[ASGIApp], ASGIApp], **kwargs: Any) -> None:
        self.wrap = wrap
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        return self.wrap(super().build_middleware_stack())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: State = app.state.capsnet
    # gRPC starts once the models are loaded and stops (draining its calls) before the batchers close
    async with state.serving(), grpc_server.serving(state, app.version):
        yield


def fast_lane(scope: Scope) -> middleware.FastRoute | None:
    return predict.fast_route(scope) or v2.fast_route(scope)


def open_paths(settings: Settings) -> tuple[str, ...]:
    """What the API key does not guard, by prefix (the web page holds no data; it sends the key)."""
    paths: tuple[str, ...] = ("/docs", "/openapi.json", "/redoc")
    paths += ("/health/", "/v2/health/") if settings.open_health else ()
    paths += ("/metrics",) if settings.open_metrics else ()
    return paths + OPEN_PREFIXES


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = State(settings)
    paths: set[str] = set()  # every route's path, for the metrics of answers given before routing

    def wrap(inner: ASGIApp) -> ASGIApp:
        return middleware.build(
            inner, state, settings, fast_lane, lambda: paths, open_paths(settings), OPEN_EXACT
        )

    app = ServiceApp(
        wrap,
        title="CapsNet inference service",
        version="0.1.0",
        description="Capsule Network (Sabour, Frosst & Hinton 2017, arXiv 1710.09829) served with "
        "onnxruntime: class probabilities as capsule lengths, 16-D poses and the routing coupling "
        "coefficients.",
        lifespan=lifespan,
        responses=REST_ERRORS,
        # FastAPI looks for a configured OpenTelemetry provider on every request, three environment
        # look-ups deep, a visible share of the event loop's time at concurrency 1: off unless asked for.
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.capsnet = state

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

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=middleware.CLIENT_GONE)  # nobody reads it; the metrics count it

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        return middleware.unexpected(request.url.path)

    routers = [family.router for family in (predict, explain, health, v2)] + [web.router]
    for router in routers:
        app.include_router(router)
    web.mount_static(app)
    paths.update(getattr(route, "path", "") for router in routers for route in router.routes)
    return app
