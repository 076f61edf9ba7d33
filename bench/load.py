"""Reliability under load: sustained load, overload and SIGTERM against the real `capsnet serve`.

`python -m bench.load` runs the three scenarios and prints JSON; the tests in tests/reliability/ run them in a
quick mode. Sustained load comes from wrk (C, leaves the cores to the server). Overload and shutdown
need per-request status and timing, which wrk does not give, so they use the small asyncio client
below: raw HTTP/1.1 on kept-alive connections, no per-request Python objects beyond a tuple.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench import free_port, log_tail, proc_cpu_rss, start_server, wrk

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BODY = REPO / "examples" / "7.png"


def serve_command(port: int) -> list[str]:
    return [sys.executable, "-m", "capsnet", "serve", "--port", str(port)]


@dataclass
class Result:
    """One request: when it was due, its status (0 = refused or closed before any answer), latency."""

    due: float
    status: int
    latency: float
    retry_after: bool = False


@dataclass
class Client:
    host: str
    port: int
    path: str
    body: bytes
    content_type: str = "image/png"
    results: list[Result] = field(default_factory=list)

    def request_bytes(self) -> bytes:
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n\r\n"
        )
        return head.encode() + self.body

    async def _send(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, payload: bytes
    ) -> tuple[int, bool, tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
        """One request on `conn` (opened when None); returns status, retry_after, the conn to reuse.

        A kept-alive connection the server closed while it was idle fails before any answer: like any
        HTTP client, send once more on a new connection (the server never saw that request)."""
        if conn is not None:
            status, retry, new = await self._send_once(conn, payload)
            if status:
                return status, retry, new
        return await self._send_once(None, payload)

    async def _send_once(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, payload: bytes
    ) -> tuple[int, bool, tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
        try:
            if conn is None:
                conn = await asyncio.open_connection(self.host, self.port)
            reader, writer = conn
            writer.write(payload)
            await writer.drain()
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionResetError("closed before an answer")
            status = int(status_line.split()[1])
            length, retry_after, close = 0, False, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "retry-after":
                    retry_after = True
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            await reader.readexactly(length)
            if close:
                writer.close()
                conn = None
            return status, retry_after, conn
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            if conn is not None:
                conn[1].close()
            return 0, False, None

    async def closed_loop(self, concurrency: int, seconds: float) -> None:
        """`concurrency` connections, each sending its next request when the last one is answered."""
        payload = self.request_bytes()
        loop = asyncio.get_running_loop()
        stop = loop.time() + seconds

        async def worker() -> None:
            conn = None
            while loop.time() < stop:
                t0 = loop.time()
                status, retry, conn = await self._send(conn, payload)
                self.results.append(Result(t0, status, loop.time() - t0, retry))
                if status == 0:
                    await asyncio.sleep(0.05)  # refused: do not spin
            if conn is not None:
                conn[1].close()

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def open_loop(self, rate: float, seconds: float, connections: int = 256) -> None:
        """Requests due at a fixed rate whatever the answers; latency counts from when one was due,
        so a client that falls behind shows up as latency (no coordinated omission)."""
        payload = self.request_bytes()
        loop = asyncio.get_running_loop()
        tickets: asyncio.Queue[float | None] = asyncio.Queue()

        async def worker() -> None:
            conn = None
            while (due := await tickets.get()) is not None:
                status, retry, conn = await self._send(conn, payload)
                self.results.append(Result(due, status, loop.time() - due, retry))
            if conn is not None:
                conn[1].close()

        workers = [asyncio.create_task(worker()) for _ in range(connections)]
        t0, n = loop.time(), int(rate * seconds)
        for k in range(n):
            due = t0 + k / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            tickets.put_nowait(due)
        for _ in workers:
            tickets.put_nowait(None)
        await asyncio.gather(*workers)


def summarize(results: list[Result], since: float = -1.0) -> dict[str, Any]:
    """Counts per status and p50/p99 latency (ms) per status."""
    out: dict[str, Any] = {"requests": 0, "status": {}}
    for status in sorted({r.status for r in results if r.due >= since}):
        lat = np.array([r.latency for r in results if r.status == status and r.due >= since]) * 1e3
        out["status"][str(status)] = {
            "count": len(lat),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "max_ms": round(float(lat.max()), 2),
        }
        out["requests"] += len(lat)
    return out


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}/predict"


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """Stop the server; the number of tracebacks in its whole log (clients that drop their
    connections at the end of a run must not produce any)."""
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)
    proc.log.seek(0)  # type: ignore[attr-defined]
    tracebacks = proc.log.read().count(b"Traceback")  # type: ignore[attr-defined]
    proc.log.close()  # type: ignore[attr-defined]
    return int(tracebacks)


def sustained_load(seconds: float, concurrency: int = 64, body: Path = DEFAULT_BODY) -> dict[str, Any]:
    """wrk at `concurrency` for `seconds`; resident memory sampled every second after a warm-up."""
    port = free_port()
    proc = start_server(serve_command(port), port, {})
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not done.wait(1.0):
            samples.append((time.monotonic() - t0, proc_cpu_rss(proc.pid)[1]))

    try:
        with tempfile.TemporaryDirectory() as tmp:
            wrk(_url(port), body, concurrency, max(5.0, seconds / 10), Path(tmp))  # warm-up
            warm_rss = proc_cpu_rss(proc.pid)[1]
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            row = wrk(_url(port), body, concurrency, seconds, Path(tmp))
            done.set()
            sampler.join()
    finally:
        tracebacks = stop_server(proc)
    rss = [r for _, r in samples] or [warm_rss]
    return {
        "seconds": seconds,
        "concurrency": concurrency,
        **{k: row[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "non_2xx", "socket_errors")},
        "rss_after_warmup_mb": round(warm_rss / 2**20, 1),
        "rss_end_mb": round(rss[-1] / 2**20, 1),
        "rss_max_mb": round(max(rss) / 2**20, 1),
        "rss_growth": round(max(rss) / warm_rss - 1.0, 4),
        "log_tracebacks": tracebacks,
    }


def overload(
    seconds: float,
    factor: float = 4.0,
    queue_size: int = 32,
    max_in_flight: int = 8,
    body: Path = DEFAULT_BODY,
) -> dict[str, Any]:
    """Measure capacity closed-loop, offer `factor` times that open-loop, then check recovery."""
    port = free_port()
    # Preprocessing a scan costs more than its inference, so what waits in front of the batcher is bounded too:
    # a few requests per core in progress, the rest refused at once.
    env = {
        "CAPSNET_QUEUE_SIZE": str(queue_size),
        "CAPSNET_MAX_BATCH_SIZE": str(queue_size),
        "CAPSNET_MAX_IN_FLIGHT": str(max_in_flight),
    }
    proc = start_server(serve_command(port), port, env)
    image = body.read_bytes()
    try:
        probe = Client("127.0.0.1", port, "/predict", image)
        asyncio.run(probe.closed_loop(max_in_flight, max(2.0, seconds / 3)))  # all admitted
        ok = [r for r in probe.results if r.status == 200]
        capacity = len(ok) / max(2.0, seconds / 3)
        flood = Client("127.0.0.1", port, "/predict", image)
        t0 = time.monotonic()
        asyncio.run(flood.open_loop(factor * capacity, seconds))
        flood_wall = time.monotonic() - t0
        after = Client("127.0.0.1", port, "/predict", image)
        asyncio.run(after.closed_loop(4, 2.0))
    finally:
        tracebacks = stop_server(proc)
    rejected = [r for r in flood.results if r.status == 503]
    return {
        "capacity_req_per_s": round(capacity, 1),
        "offered_req_per_s": round(factor * capacity, 1),
        "queue_size": queue_size,
        "max_in_flight": max_in_flight,
        "seconds": seconds,
        "flood_wall_s": round(flood_wall, 2),
        "flood": summarize(flood.results),
        "rejected_with_retry_after": sum(r.retry_after for r in rejected),
        "recovery": summarize(after.results),
        "log_tracebacks": tracebacks,
    }


def graceful_shutdown(
    load_seconds: float = 2.0, concurrency: int = 16, body: Path = DEFAULT_BODY
) -> dict[str, Any]:
    """SIGTERM while `concurrency` clients keep sending: what happened to each request, and how long the
    process took to exit."""
    port = free_port()
    proc = start_server(serve_command(port), port, {})
    client = Client("127.0.0.1", port, "/predict", body.read_bytes())
    sent_at: dict[str, float] = {}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def terminate() -> None:
            await asyncio.sleep(load_seconds)
            sent_at["sigterm"] = loop.time()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            try:  # a new connection half a second later
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                sent_at["new_connection"] = 1.0
            except OSError:
                sent_at["new_connection"] = 0.0

        await asyncio.gather(client.closed_loop(concurrency, load_seconds + 3.0), terminate())

    try:
        t_wall = time.monotonic()
        asyncio.run(scenario())
        code = proc.wait(60)
        exit_s = time.monotonic() - t_wall - load_seconds
        log = log_tail(proc.log)  # type: ignore[attr-defined]
    finally:
        tracebacks = stop_server(proc)
    sigterm = sent_at["sigterm"]
    before = [r for r in client.results if r.due < sigterm]
    # uvicorn looks at its exit flag every 0.1 s: requests sent in that window may still be served
    after = [r for r in client.results if r.due >= sigterm + 0.25]
    return {
        "exit_code": code,  # uvicorn re-raises the SIGTERM it handled: -15 after a clean shutdown
        "clean_shutdown_logged": "Application shutdown complete" in log,
        "new_connection_accepted_after_0_5_s": bool(sent_at["new_connection"]),
        "exit_after_sigterm_s": round(exit_s, 2),
        "before_sigterm": summarize(before),
        "after_sigterm_0_25_s": summarize(after),
        "in_flight_at_sigterm": sum(1 for r in before if r.due + r.latency > sigterm),
        "in_flight_answered_200": sum(1 for r in before if r.due + r.latency > sigterm and r.status == 200),
        "log_tracebacks": tracebacks,
    }


def main(*, seconds: float, concurrency: int, output: Path | None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    report = {
        "sustained_load": sustained_load(seconds, concurrency),
        "overload": overload(max(6.0, seconds / 5)),
        "graceful_shutdown": graceful_shutdown(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.load",
        description="sustained load, 4x overload and SIGTERM against `capsnet serve`",
    )
    p.add_argument("--seconds", type=float, default=300.0, help="sustained load duration (wrk)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--output", type=Path, default=None, help="also write the JSON report here")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    main(seconds=args.seconds, concurrency=args.concurrency, output=args.output)
