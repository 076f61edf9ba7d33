"""uvicorn's httptools protocol with the limits a hostile client needs, and what `capsnet serve` runs.

uvicorn (httptools) buffers a request's header block without bound and waits forever for a head or a
body that trickles in. `LimitedHttpToolsProtocol` adds, per connection:
- a cap on the header block (`CAPSNET_HTTP_MAX_HEADER_BYTES`): over it, 431 and the connection
  closes, without buffering beyond the cap;
- a deadline for the head (`CAPSNET_HTTP_HEADER_TIMEOUT_S`, from the connection's first byte or the
  end of the previous answer): 408 and close;
- a deadline for the body (`CAPSNET_HTTP_BODY_TIMEOUT_S`, from the end of the head): the connection
  closes (the handler sees the client gone: 499).
The keep-alive idle timeout is uvicorn's own (`CAPSNET_HTTP_KEEP_ALIVE_S`).

It also sends an answer's head and body in one write (`OneWrite`): uvicorn writes them apart, two
sends per answer, each waking the client.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from capsnet.service.settings import get_settings


class OneWrite:
    """The transport a request's cycle writes to: what it writes within one turn of the event loop
    goes out in one write, at the end of the answer or at the end of that turn, whichever is first,
    so nothing waits for more than the turn it was written in."""

    __slots__ = ("held", "loop", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport, self.loop = transport, loop
        self.held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self.held:
            self.loop.call_soon(self.flush)
        self.held.append(data)

    def flush(self) -> None:
        if self.held:
            data = self.held[0] if len(self.held) == 1 else b"".join(self.held)
            self.held.clear()
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = get_settings()
        self.max_head = s.http_max_header_bytes
        self.head_timeout, self.body_timeout = s.http_header_timeout_s, s.http_body_timeout_s
        self.in_head = True  # reading a request's head (also before its first byte)
        self.head_bytes = 0
        self.deadline: asyncio.TimerHandle | None = None
        self.one_write: OneWrite | None = None

    # -- deadlines

    def _arm(self, seconds: float, on_expiry: Any) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, on_expiry)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _head_too_slow(self) -> None:
        self.deadline = None
        self._refuse(408, f"the request head did not arrive within {self.head_timeout} s")

    def _body_too_slow(self) -> None:
        self.deadline = None
        self.logger.info("closing a connection whose body did not arrive within %s s", self.body_timeout)
        self.transport.close()

    def _refuse(self, status: int, detail: str) -> None:
        """Answer before any handler ran, then close (what uvicorn does for a malformed request)."""
        if self.transport.is_closing():
            return
        body = orjson.dumps({"detail": detail})
        head = [STATUS_LINE[status], b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]  # fmt: skip
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    # -- uvicorn's hooks

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.one_write = OneWrite(transport, self.loop)
        self._arm(self.head_timeout, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.in_head:
            super().data_received(data)
            return
        room = self.max_head - self.head_bytes
        if len(data) <= room:
            self.head_bytes += len(data)
            super().data_received(data)
            return
        # Feed what fits: if the head ends inside it, the rest is body (or the next request).
        self.head_bytes = self.max_head
        super().data_received(data[:room])
        if self.in_head:
            self._refuse(431, f"the request's header block exceeds {self.max_head} bytes")
            return
        super().data_received(data[room:])

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self.in_head:  # a pipelined request after a complete one
            self.in_head, self.head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._arm(self.body_timeout, self._body_too_slow)
        super().on_headers_complete()
        if self.cycle is not None and self.one_write is not None:
            self.cycle.transport = self.one_write  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self.one_write is not None:
            self.one_write.flush()  # the whole answer, now
        super().on_response_complete()
        if not self.transport.is_closing():  # waiting for the next request on a kept-alive connection
            self.in_head, self.head_bytes = True, 0
            self._arm(self.head_timeout, self._head_too_slow)
