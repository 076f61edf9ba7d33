"""What the service holds while it runs, in one place both route families (REST and the Open
Inference Protocol) import: the settings, the metrics and the model repository, each model with its
engine, batcher and readiness; and the one way a request's images reach a model (`State.infer`).

The first model directory is the default (CAPSNET_MODEL_DIR, behind /predict and the other REST
endpoints when a request names no `?model=`); CAPSNET_MODEL_DIRS adds more, each served under the `name`
in its ONNX metadata, by that name on the REST endpoints (`?model=`) and the /v2 paths.

Reload without downtime (`State.load`): the directory's files are opened and warmed up in a new engine
and batcher beside the old ones, then swapped in with one assignment on the event loop. Requests that
already hold the old version finish on it (its batcher drains before it closes); one that reaches the
old batcher after it closed is handed to the new version. `State.unload` drains the same way, then the
model answers 503 until it is loaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import Request

from capsnet.service import logs
from capsnet.service.batcher import Batcher, BatchStats, EngineClosedError, Outputs, QueueFullError
from capsnet.service.engine import Engine, EngineError
from capsnet.service.errors import APIError
from capsnet.service.metrics import Metrics, forget_dead_workers
from capsnet.service.protocol import Signature
from capsnet.service.settings import Settings, shipped_models
from capsnet.service.workers import WorkerSync

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One version of one model: ready once its warm-up ran; retired once another replaced it or it
    was unloaded."""

    engine: Engine
    batcher: Batcher
    ready: bool = False
    retired: bool = False
    signature: Signature = field(init=False)

    def __post_init__(self) -> None:
        self.signature = Signature.of(self.engine)

    @property
    def name(self) -> str:
        return self.engine.info.name

    @property
    def version(self) -> str:
        return self.engine.info.version

    def check_ready(self) -> None:
        """503 until the warm-up ran (and after the version was retired)."""
        if not self.ready:
            raise APIError(503, f"model {self.name!r} is loading or warming up", {"Retry-After": "1"})


@dataclass
class Slot:
    """A model directory the server knows, and what it serves from it now (None: unloaded)."""

    directory: Path
    model: ServedModel | None = None
    reason: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Repository:
    """The model directories by model name, in the settings' order; the first one is the default."""

    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}

    @property
    def models(self) -> dict[str, ServedModel]:
        """The models being served, by name."""
        return {name: slot.model for name, slot in self.slots.items() if slot.model is not None}

    @property
    def default_slot(self) -> Slot:
        return next(iter(self.slots.values()))

    @property
    def default(self) -> ServedModel | None:
        return self.default_slot.model

    def add(self, model: ServedModel, directory: Path) -> None:
        if model.name in self.slots:
            raise EngineError(f"two model directories carry the model name {model.name!r}")
        self.slots[model.name] = Slot(directory, model)

    def slot(self, name: str) -> Slot:
        if name not in self.slots:
            raise APIError(404, f"unknown model {name!r}; this server has {sorted(self.slots)}")
        return self.slots[name]

    def get(self, name: str, version: str | None = None) -> ServedModel:
        slot = self.slot(name)
        if slot.model is None:
            raise APIError(503, f"model {name!r} is not loaded ({slot.reason}); load it with "
                           f"POST /v2/repository/models/{name}/load")  # fmt: skip
        if version is not None and version != slot.model.version:
            raise APIError(404, f"model {name!r} has no version {version!r}; it has [{slot.model.version!r}]")
        return slot.model

    def warming(self) -> list[str]:
        """The loaded models whose warm-up has not run yet (an unloaded model is not waited for)."""
        return [name for name, model in self.models.items() if not model.ready]

    def index(self) -> list[dict[str, str]]:
        """Triton's repository index: every model directory, READY or UNAVAILABLE with the reason."""
        out = []
        for name, slot in self.slots.items():
            model = slot.model
            state = "READY" if model is not None and model.ready else "UNAVAILABLE"
            reason = slot.reason if model is None else ("" if model.ready else "warming up")
            out.append({"name": name, "version": model.version if model else "", "state": state,
                        "reason": reason})  # fmt: skip
        return out


def model_dirs(settings: Settings) -> list[Path]:
    """CAPSNET_MODEL_DIR, then CAPSNET_MODEL_DIRS without repeats; CAPSNET_MODEL_DIRS unset, the other
    shipped models beside the shipped default (none beside a model of the operator's)."""
    out = [settings.model_dir]
    seen = {settings.model_dir.resolve()}
    if settings.model_dirs is not None:
        more = [Path(part.strip()) for part in settings.model_dirs.split(",") if part.strip()]
    else:
        shipped = shipped_models()
        more = shipped[1:] if settings.model_dir.resolve() == shipped[0].resolve() else []
    for path in more:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            out.append(path)
    return out


class State:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.models: Repository | None = None  # set while the lifespan runs
        self.sync = WorkerSync.from_environment(settings.workers)  # capsnet serve sets CAPSNET_WORKERS
        # Inference requests in progress in this process, each kind held to max_in_flight on its own:
        # REST POSTs (the middleware counts them) and gRPC ModelInfer calls (the servicer).
        self.posts_in_flight = 0
        self.infer_calls_in_flight = 0

    def repository(self) -> Repository:
        """The models, once the lifespan has loaded them; 503 before (and while shutting down)."""
        if self.models is None:
            raise APIError(503, "the models are not loaded yet", {"Retry-After": "1"})
        return self.models

    def not_ready(self) -> str | None:
        """Why /health/ready answers 503, or None when it answers 200: every loaded model warmed up
        (as Triton's strict readiness and /v2/health/ready have it) and the default one loaded, for
        the requests that name no model. A probe that passed while a second model still warmed up
        would send traffic that model answers with 503."""
        if self.models is None:
            return "the models are not loaded (starting or shutting down)"
        if self.models.default is None:
            return "the default model is unloaded"
        if warming := self.models.warming():
            return f"warming up: {', '.join(warming)}"
        return None

    def alone(self) -> bool:
        """Whether the request asking is the only one in progress: nothing else needs the event loop
        while it works there (inputs.py preprocesses a scan-sized upload on the loop then)."""
        return self.posts_in_flight + self.infer_calls_in_flight <= 1

    @property
    def all_warm(self) -> bool:
        """Every loaded model has warmed up: /v2/health/ready, gRPC ServerReady and grpc.health."""
        return self.models is not None and not self.models.warming()

    def default_model(self) -> ServedModel:
        """The default model once it is warm, else 503."""
        model = self.models.default if self.models is not None else None
        if model is None or not model.ready:
            raise APIError(503, "the model is not loaded yet", {"Retry-After": "1"})
        return model

    def model(self, name: str | None) -> ServedModel:
        """The model a REST request names (`?model=`), warm, or the default one when it names none:
        404 for a name not served, 503 while it is unloaded or warming up, as on the /v2 paths."""
        if name is None:
            return self.default_model()
        model = self.repository().get(name)
        model.check_ready()
        return model

    def busy(self, model: ServedModel, why: str) -> APIError:
        """The 503 for a full queue, counted: refused before reading the body, or when submitting."""
        self.metrics.rejected.labels(model.name).inc()
        return APIError(503, f"the server is busy: {why}; retry shortly", {"Retry-After": "1"})

    def admit(self, model: ServedModel) -> None:
        """Refuse a request before paying for reading and decoding it when the queue is full."""
        waiting, limit = model.batcher.pending, self.settings.queue_size
        if waiting >= limit:
            raise self.busy(model, f"{waiting} images are waiting (limit {limit})")

    async def infer(
        self, model: ServedModel, images: np.ndarray, coupling: bool = False, timeout: float | None = None
    ) -> Outputs:
        """The model's outputs for images (k, 1, 28, 28), through its batcher; APIError 503/504.
        `timeout`: the caller's own deadline (gRPC's), else CAPSNET_REQUEST_TIMEOUT_S."""
        timeout = self.settings.request_timeout_s if timeout is None else timeout
        entry = logs.current.get()
        while True:
            if entry is not None:  # for the access line
                entry.model, entry.version, entry.images = model.name, model.version, len(images)
            try:
                out = await model.batcher.submit(images, coupling, timeout)
                break
            except QueueFullError as exc:
                raise self.busy(model, str(exc)) from None
            except EngineClosedError as exc:
                if not model.retired or self.models is None:
                    raise APIError(503, str(exc), {"Retry-After": "5"}) from None
                model = self.models.get(model.name)  # the version that replaced it (503 if unloaded)
            except TimeoutError:
                raise APIError(504, f"inference took longer than {timeout} s") from None
        if entry is not None:
            entry.batch = out.batch
        return out

    # -- the repository: loading, reloading, unloading

    def _serve(self, engine: Engine) -> ServedModel:
        s = self.settings
        observe, pending = self.metrics.observer(engine.info.name)
        stats = BatchStats(observe, pending)
        batcher = Batcher(
            engine, s.max_batch_size, s.max_wait_ms, s.queue_size, stats, workers=engine.parallel_batches
        )
        model = ServedModel(engine, batcher)
        batcher.start()
        return model

    async def _retire(self, model: ServedModel) -> None:
        """Stop sending work to a version; it finishes what it holds, then closes."""
        model.retired, model.ready = True, False
        self.metrics.model_info.labels(model.name, model.version).set(0)
        await model.batcher.close(grace_s=self.settings.request_timeout_s)

    async def load(self, name: str) -> None:
        """(Re)load a known model from its directory, warm, then swap; publish it to the other workers."""
        await self._apply(name, True)
        if self.sync is not None:
            await self.sync.publish(name, True)

    async def unload(self, name: str) -> None:
        await self._apply(name, False)
        if self.sync is not None:
            await self.sync.publish(name, False)

    async def _apply(self, name: str, loaded: bool) -> None:
        repo = self.repository()
        slot = repo.slot(name)
        async with slot.lock:  # one change at a time per model
            if not loaded:
                old, slot.model, slot.reason = slot.model, None, "unloaded"
                if old is not None:
                    await self._retire(old)
                log.info("%s: unloaded", name)
                return
            try:
                engine = await asyncio.to_thread(  # the default model is the first slot, as at startup
                    functools.partial(Engine.from_settings, beside=slot is not repo.default_slot),
                    self.settings,
                    slot.directory,
                )
            except EngineError as exc:
                raise APIError(400, f"failed to load model {name!r}: {exc}") from None
            if engine.info.name != name:
                raise APIError(400, f"the directory of model {name!r} now holds model {engine.info.name!r}")
            model = self._serve(engine)
            await _warm_up(model, self.settings.max_batch_size)
            old, slot.model, slot.reason = slot.model, model, ""  # the swap: new requests go to `model`
            self.metrics.model_info.labels(name, model.version).set(1)
            if old is not None and old is not model:
                await self._retire(old)
            log.info("%s: loaded version %s", name, model.version)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Load every model (startup fails on a bad one), start their batchers and warm-ups; on exit
        refuse new work, drain the batchers and stop."""
        s = self.settings
        logs.quiet_onnxruntime(s.log_format)
        forget_dead_workers()
        repo = Repository()
        tasks: list[asyncio.Task[Any]] = []
        try:
            for k, directory in enumerate(model_dirs(s)):
                engine = await asyncio.to_thread(
                    functools.partial(Engine.from_settings, beside=k > 0), s, directory
                )
                model = self._serve(engine)
                repo.add(model, directory)
                self.metrics.model_info.labels(model.name, model.version).set(1)
                tasks.append(asyncio.create_task(_warm_up(model, s.max_batch_size)))
            self.models = repo
            if self.sync is not None:  # decisions the other workers made before this one started
                await self.sync.start(self._apply)
                tasks.append(asyncio.create_task(self.sync.follow(self._apply)))
            yield
        finally:
            self.models = None
            for task in tasks:
                task.cancel()
            for slot in repo.slots.values():
                if slot.model is not None:
                    slot.model.ready = False
                    await slot.model.batcher.close()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def _warm_up(model: ServedModel, max_batch: int) -> None:
    seconds = await asyncio.to_thread(model.engine.warm_up, max_batch)
    model.ready = True
    log.info("%s: warm-up done in %.3f s; ready", model.name, seconds)


def get_state(request: Request) -> State:
    """The app's State (FastAPI runs a plain function dependency in a worker thread: this is called
    directly instead)."""
    state: State = request.app.state.capsnet
    return state
