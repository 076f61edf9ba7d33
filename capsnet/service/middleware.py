"""The pure-ASGI layers every request passes, outside FastAPI's own stack, as few as possible:

1. `Accounting`: requests and latency per route template and status in the metrics; a client that
   went away before its answer is counted as 499 (as nginx does), not logged as an error.
2. CORS (Starlette's), only when origins are configured.
3. `Guard`: the keys (capsnet.service.auth: the API key; on the management routes, load and unload, model
   control and the admin key instead), admission (at most `max_in_flight` POST requests inside the
   app; the next gets 503 + Retry-After before its body is read) and the fast lane: the inference
   routes (`/predict`, `/v2/models/{name}/infer`) called directly for their common form, without
   FastAPI's routing, dependency solving and five more middleware layers. Requests in any other form
   (another query, a version path) take FastAPI's route, which runs the same handler.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from capsnet.service import logs
from capsnet.service.auth import ModelControl, bearer_matches, management_route, secret
from capsnet.service.errors import APIError, error_response
from capsnet.service.settings import Settings
from capsnet.service.state import State

log = logging.getLogger(__name__)

CLIENT_GONE = 499  # nginx's status for a client that closed the connection before the answer

# (handler, route template): the handler answers a request that takes the fast lane
FastRoute = tuple[Callable[[Request, State], Awaitable[Response]], str]
FastLane = Callable[[Scope], FastRoute | None]


def unexpected(path: str) -> Response:
    log.exception("unhandled error")
    return error_response(path, 500, "internal server error")


class Accounting:
    """The request ID (kept from `X-Request-ID` or made, sent back on every answer, on every log line
    of the request), the metrics by matched route template (a label per route, never per URL) and
    the one access line of each request."""

    def __init__(self, app: ASGIApp, state: State, paths: Callable[[], set[str]]) -> None:
        self.app, self.metrics, self.paths = app, state.metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entry = logs.RequestLog(logs.request_id_of(scope["headers"]), scope["method"], scope["path"])
        logs.current.set(entry)  # this request's task: its handlers and log lines see it
        rid = entry.request_id.encode("ascii")
        status, sent = 500, 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (logs.REQUEST_ID_HEADER, rid)]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # the fast lane's template, or FastAPI's matched route (/v2/models/{name}/infer); answered
            # before routing (401, 503 busy): the path when it is a route's, else "other"
            route = scope.get("capsnet.route") or getattr(scope.get("route"), "path", None)
            path = route or (scope["path"] if scope["path"] in self.paths() else "other")
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - entry.started)
            logs.log_access(entry, path, status, sent)


class Guard:
    """API key, admission and the fast lane, in that order, in one layer."""

    def __init__(
        self,
        app: ASGIApp,
        state: State,
        fast_lane: FastLane,
        open_paths: tuple[str, ...] = (),
        open_exact: tuple[str, ...] = (),
    ) -> None:
        self.app, self.state, self.fast_lane = app, state, fast_lane
        self.key, self.control = secret(state.settings.api_key), ModelControl(state.settings)
        self.open_paths, self.open_exact = open_paths, open_exact
        self.limit = state.settings.max_in_flight

    def authorized(self, scope: Scope) -> bool:
        path = scope["path"]
        if self.key is None or path in self.open_exact or path.startswith(self.open_paths):
            return True
        return bearer_matches(authorization(scope), self.key)

    def refusal(self, scope: Scope) -> Response | None:
        """The answer to a request the keys refuse, or None."""
        path = scope["path"]
        route = management_route(path)
        if route is None:
            if self.authorized(scope):
                return None
            detail = "missing or wrong API key: send `Authorization: Bearer <key>`"
            return error_response(path, 401, detail, {"WWW-Authenticate": "Bearer"})
        try:  # the management group: the admin key, never the API key
            self.control.check(authorization(scope), "send `Authorization: Bearer <admin key>`")
        except APIError as exc:
            scope["capsnet.route"] = route  # counted under the route's template, as if it had run
            return error_response(path, exc.status_code, exc.detail, exc.headers)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if (refused := self.refusal(scope)) is not None:
            await refused(scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        state = self.state
        if state.posts_in_flight >= self.limit:
            detail = (
                f"the server is busy: {state.posts_in_flight} requests in progress (limit {self.limit}); "
                "retry shortly"
            )
            await error_response(path, 503, detail, {"Retry-After": "1"})(scope, receive, send)
            return
        state.posts_in_flight += 1
        try:
            fast = self.fast_lane(scope)
            if fast is None:
                await self.app(scope, receive, send)
            else:
                handler, scope["capsnet.route"] = fast
                await self.answer(handler, scope, receive, send)
        finally:
            state.posts_in_flight -= 1

    async def answer(
        self,
        handler: Callable[[Request, State], Awaitable[Response]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """A fast-lane request, answered as FastAPI's exception handlers would."""
        path = scope["path"]
        try:
            response = await handler(Request(scope, receive), self.state)
        except APIError as exc:
            response = error_response(path, exc.status_code, exc.detail, exc.headers)
        except ClientDisconnect:
            response = Response(status_code=CLIENT_GONE)
        except Exception:
            response = unexpected(path)
        await response(scope, receive, send)


def authorization(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bytes(value)
    return None


def build(
    app: ASGIApp,
    state: State,
    settings: Settings,
    fast_lane: FastLane,
    paths: Callable[[], set[str]],
    open_paths: tuple[str, ...],
    open_exact: tuple[str, ...],
) -> ASGIApp:
    """FastAPI's stack inside the guard, inside CORS (when configured), inside the accounting."""
    guarded: ASGIApp = Guard(app, state, fast_lane, open_paths, open_exact)
    if settings.cors_origins.strip():
        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        guarded = CORSMiddleware(guarded, allow_origins=origins, allow_methods=["GET", "POST"],
                                 allow_headers=["Authorization", "Content-Type", "Accept"])  # fmt: skip
    return Accounting(guarded, state, paths)
