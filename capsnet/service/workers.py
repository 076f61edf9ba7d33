"""How the worker processes of one server agree on the model repository (`capsnet serve --workers N`).

Each worker holds its own onnxruntime sessions, so a load or unload answered by one worker must reach
the others. The answering worker applies the change itself, then publishes it in the shared folder
(CAPSNET_SHARED_DIR, made by `capsnet serve`): `repository.json` holds, per model, whether it should
be loaded and the generation of that decision. Every worker polls the file, applies what is newer than
what it applied, and writes `ack-<pid>.json` with the generation it reached. The answering worker
replies once every live worker has acknowledged, so a 200 means the whole server serves the change.
A worker that uvicorn starts again later reads the same file at startup.

With one worker (no shared folder) all of this is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from capsnet.service.errors import APIError

log = logging.getLogger(__name__)

SHARED_DIR_ENV = "CAPSNET_SHARED_DIR"
POLL_S = 0.2

# (model name, loaded?) -> apply it in this worker
Apply = Callable[[str, bool], Awaitable[None]]


class WorkerSync:
    def __init__(self, folder: Path, workers: int) -> None:
        self.folder, self.workers, self.pid = folder, workers, os.getpid()
        self.state_file, self.lock_file = folder / "repository.json", folder / "repository.lock"
        self.applied = 0  # the generation this worker has applied

    @classmethod
    def from_environment(cls, workers: int) -> WorkerSync | None:
        folder = os.environ.get(SHARED_DIR_ENV)
        return cls(Path(folder), workers) if folder and workers > 1 else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_file, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            doc = {"generation": 0, "models": {}}
        return doc

    def _ack(self, failed: dict[str, str]) -> None:
        path = self.folder / f"ack-{self.pid}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"generation": self.applied, "failed": failed}))
        tmp.replace(path)

    async def start(self, apply: Apply) -> None:
        """At a worker's startup: apply what the others decided before it started, then acknowledge."""
        await self._catch_up(apply)

    async def _catch_up(self, apply: Apply) -> None:
        doc = await asyncio.to_thread(self._read)
        failed: dict[str, str] = {}
        for name, entry in doc["models"].items():
            if entry["generation"] > self.applied:
                try:
                    await apply(name, entry["loaded"])
                except APIError as exc:
                    failed[name] = exc.detail
        self.applied = doc["generation"]
        await asyncio.to_thread(self._ack, failed)

    async def follow(self, apply: Apply) -> None:
        """Poll for decisions of the other workers, for as long as the server runs."""
        while True:
            await asyncio.sleep(POLL_S)
            generation = (await asyncio.to_thread(self._read))["generation"]
            if generation > self.applied:
                await self._catch_up(apply)

    async def publish(self, name: str, loaded: bool, timeout_s: float = 60.0) -> None:
        """Record a decision this worker has applied; wait until every live worker has applied it."""

        def write() -> int:
            with self._locked():
                doc = self._read()
                doc["generation"] += 1
                doc["models"][name] = {"loaded": loaded, "generation": doc["generation"]}
                self.applied = max(self.applied, doc["generation"])  # our caller applied it: never again
                tmp = self.state_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(doc))
                tmp.replace(self.state_file)
                return int(doc["generation"])

        generation = await asyncio.to_thread(write)
        await asyncio.to_thread(self._ack, {})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            acks = await asyncio.to_thread(self._acks)
            done = {pid: a for pid, a in acks.items() if a["generation"] >= generation}
            failed = {pid: a["failed"][name] for pid, a in done.items() if name in a["failed"]}
            if failed:
                raise APIError(500, f"model {name!r}: worker(s) failed to apply the change: {failed}")
            if len(done) >= self.workers:
                return
            if loop.time() > deadline:
                waiting = sorted(set(acks) - set(done))
                raise APIError(504, f"model {name!r}: applied here, but workers {waiting} have not "
                               f"acknowledged within {timeout_s:.0f} s")  # fmt: skip
            await asyncio.sleep(POLL_S / 2)

    def _acks(self) -> dict[int, dict[str, Any]]:
        """The acknowledgements of the live workers, by pid."""
        out = {}
        for path in self.folder.glob("ack-*.json"):
            pid = int(path.stem.split("-", 1)[1])
            if Path(f"/proc/{pid}").exists():
                with contextlib.suppress(FileNotFoundError, ValueError):
                    out[pid] = json.loads(path.read_text())
        return out
