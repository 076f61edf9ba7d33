"""`capsnet serve` as a real process, for tests that need what only the real server does (its HTTP
protocol and limits, its logging, its workers): started on a free port, stopped on exit."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def rss_mb(self) -> float:
        """Resident memory of the server process (the first worker's parent with one worker)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
        return float("nan")


@contextlib.contextmanager
def capsnet_serve(
    tmp_path: Path, env: dict[str, str], args: tuple[str, ...] = (), ready: str = "/v2/health/ready"
) -> Iterator[Server]:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "capsnet", "serve", "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"capsnet serve exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready in 90 s: {log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(server.url + ready).status_code == 200:
                    break
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
