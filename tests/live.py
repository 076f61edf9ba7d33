"""The real app, started and ready: a TestClient that waits for the warm-up, and uvicorn in a background
thread for clients that need a socket (tritonclient, a browser, schemathesis).

The lifespan loads the model, then warms it up in the background; until that is done the model
endpoints answer 503 "not loaded yet" / "starting". A test that sends a request right after startup
races the warm-up, so every test starts the app through one of these two, which wait for readiness.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn
from fastapi.testclient import TestClient

from capsnet.service.app import create_app
from capsnet.service.engine import Engine
from capsnet.service.settings import Settings

# Every model warm (Triton's strict readiness), not only the default one that /health/ready covers: a
# test that starts two models and asks the second must not race its warm-up.
READY_PATH = "/v2/health/ready"
READY_TIMEOUT_S = 120  # the shipped model's warm-up at batch 64 on 2 busy cores takes seconds


class ReadyClient(TestClient):
    """`with ReadyClient(app) as client:` returns once `ready_path` answers 200, and fails (never
    carries on) when it does not within READY_TIMEOUT_S."""

    def __init__(self, app: Any, ready_path: str = READY_PATH, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.ready_path = ready_path

    def __enter__(self) -> ReadyClient:
        super().__enter__()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (r := self.get(self.ready_path)).status_code != 200:
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise AssertionError(f"not ready after {READY_TIMEOUT_S} s: {r.status_code} {r.text}")
            time.sleep(0.02)
        return self


def ready_client(settings: Settings, ready_path: str = READY_PATH) -> ReadyClient:
    return ReadyClient(create_app(settings), ready_path=ready_path)


@contextlib.contextmanager
def serve(settings: Settings, ready_path: str = READY_PATH) -> Iterator[str]:
    """Yields host:port once `ready_path` answers 200; stops the server on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(settings), lifespan="on", log_level="warning", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert thread.is_alive(), "the server stopped during startup"
            assert time.monotonic() < deadline, f"the server did not become ready in {READY_TIMEOUT_S} s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://{url}{ready_path}").status_code == 200:
                    break
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def gate_warm_up(monkeypatch, name: str | None = None) -> threading.Event:
    """Engine warm-ups (of the model `name` only, if given) wait until the event is set."""
    gate = threading.Event()
    real = Engine.warm_up

    def gated(self, max_batch):
        if name is None or self.info.name == name:
            gate.wait(10)
        return real(self, max_batch)

    monkeypatch.setattr(Engine, "warm_up", gated)
    return gate


def slow_classify(monkeypatch, wait, when=lambda images: bool(images.any())):
    """Make Engine.classify call `wait()` first for the batches `when` picks (the blank warm-up batches
    pass through); return the real method."""
    real = Engine.classify

    def slow(self, images, outputs=None, narrow=False):
        if when(images):
            wait()
        return real(self, images, outputs, narrow)

    monkeypatch.setattr(Engine, "classify", slow)
    return real
