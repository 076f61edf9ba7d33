"""capsnet/service/server.py's one write per answer: what a request's cycle writes within one turn of the
event loop leaves in one transport write, and nothing waits longer than that turn."""

import asyncio

from starlette.responses import Response, StreamingResponse
from uvicorn.config import Config
from uvicorn.server import ServerState

from capsnet.service.server import LimitedHttpToolsProtocol, OneWrite


class RecordingTransport(asyncio.Transport):
    """A connection's transport that keeps what is written, write by write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def test_writes_of_one_turn_leave_as_one_write_in_order():
    async def scenario():
        transport = RecordingTransport()
        out = OneWrite(transport, asyncio.get_running_loop())
        out.write(b"HTTP/1.1 200 OK\r\n\r\n")
        out.write(b"body")
        assert transport.writes == []  # held until the answer ends or the turn does
        await asyncio.sleep(0)
        assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        out.write(b"next")
        out.flush()
        await asyncio.sleep(0)  # the turn's own flush finds nothing left
        return transport.writes

    assert asyncio.run(scenario()) == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"next"]


def test_close_sends_what_is_held_first():
    async def scenario():
        transport = RecordingTransport()
        out = OneWrite(transport, asyncio.get_running_loop())
        out.write(b"last words")
        out.close()
        return transport.writes, transport.closed

    assert asyncio.run(scenario()) == ([b"last words"], True)


def _serve_one(app, transport: RecordingTransport) -> None:
    """One GET through LimitedHttpToolsProtocol on `transport`, until its answer is complete."""

    async def scenario():
        config = Config(app=app, lifespan="off")
        config.load()
        protocol = LimitedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        protocol.connection_made(transport)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        for _ in range(200):
            if protocol.cycle is not None and protocol.cycle.response_complete:
                break
            await asyncio.sleep(0.005)
        protocol.connection_lost(None)

    asyncio.run(scenario())


def test_a_whole_answer_leaves_in_one_write():
    async def app(scope, receive, send):
        await Response(b'{"ok":1}', media_type="application/json")(scope, receive, send)

    transport = RecordingTransport()
    _serve_one(app, transport)
    assert len(transport.writes) == 1  # uvicorn alone writes the head and the body apart
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 8" in head and body == b'{"ok":1}'


def test_a_streamed_answer_sends_its_head_before_the_rest_is_made():
    transport = RecordingTransport()
    sent_before_second: list[bytes] = []

    async def chunks():
        yield b"first"
        await asyncio.sleep(0.02)
        sent_before_second.append(b"".join(transport.writes))
        yield b"second"

    async def app(scope, receive, send):
        await StreamingResponse(chunks())(scope, receive, send)

    _serve_one(app, transport)
    assert sent_before_second[0].startswith(b"HTTP/1.1 200 OK")
    assert sent_before_second[0].endswith(b"5\r\nfirst\r\n")  # nothing held while the app waited
    assert b"".join(transport.writes).endswith(b"6\r\nsecond\r\n0\r\n\r\n")
