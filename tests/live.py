"""The real app under uvicorn in a background thread, for clients that need a socket (tritonclient,
a browser, schemathesis)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn

from service.app import create_app
from service.settings import Settings


@contextlib.contextmanager
def serve(settings: Settings, ready_path: str = "/health/ready") -> Iterator[str]:
    """Yields host:port once `ready_path` answers 200; stops the server on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(settings), lifespan="on", log_level="warning", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert thread.is_alive(), "the server stopped during startup"
            assert time.monotonic() < deadline, "the server did not become ready in 60 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://{url}{ready_path}").status_code == 200:
                    break
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
