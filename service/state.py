"""What the service holds while it runs, in one place both route families (REST and the Open
Inference Protocol) import: the settings, the metrics and the models, each with its engine, batcher
and readiness; and the one way a request's images reach a model (`State.infer`).

The first model is the default (CAPSNET_MODEL_DIR, also behind /predict); CAPSNET_MODEL_DIRS adds
more, each served under the `name` in its ONNX metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from starlette.requests import Request

from service import logs
from service.batcher import Batcher, BatchStats, EngineClosedError, Outputs, QueueFullError
from service.engine import Engine, EngineError
from service.errors import APIError
from service.metrics import Metrics
from service.protocol import Signature
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One model: ready once its warm-up ran."""

    engine: Engine
    batcher: Batcher
    ready: bool = False
    signature: Signature = field(init=False)

    def __post_init__(self) -> None:
        self.signature = Signature.of(self.engine)

    @property
    def name(self) -> str:
        return self.engine.info.name

    @property
    def version(self) -> str:
        return self.engine.info.version


class Repository:
    """The models by name, in the order they were added; the first one is the default."""

    def __init__(self) -> None:
        self.models: dict[str, ServedModel] = {}

    def add(self, model: ServedModel) -> None:
        if model.name in self.models:
            raise EngineError(f"two model directories carry the model name {model.name!r}")
        self.models[model.name] = model

    @property
    def default(self) -> ServedModel:
        return next(iter(self.models.values()))

    def get(self, name: str, version: str | None = None) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise APIError(404, f"unknown model {name!r}; this server has {sorted(self.models)}")
        if version is not None and version != model.version:
            raise APIError(404, f"model {name!r} has no version {version!r}; it has [{model.version!r}]")
        return model


def model_dirs(settings: Settings) -> list[Path]:
    """CAPSNET_MODEL_DIR, then CAPSNET_MODEL_DIRS without repeats."""
    out = [settings.model_dir]
    seen = {settings.model_dir.resolve()}
    for part in settings.model_dirs.split(","):
        if part.strip() and (path := Path(part.strip())).resolve() not in seen:
            seen.add(path.resolve())
            out.append(path)
    return out


class State:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.models: Repository | None = None  # set while the lifespan runs

    @property
    def ready(self) -> bool:
        """The default model is warmed up (what /health/ready answers)."""
        return self.models is not None and self.models.default.ready

    def default_model(self) -> ServedModel:
        """The default model once it is warm, else 503."""
        if self.models is None or not self.models.default.ready:
            raise APIError(503, "the model is not loaded yet", {"Retry-After": "1"})
        return self.models.default

    def busy(self, why: str) -> APIError:
        """The 503 for a full queue, counted: refused before reading the body, or when submitting."""
        self.metrics.rejected.inc()
        return APIError(503, f"the server is busy: {why}; retry shortly", {"Retry-After": "1"})

    def admit(self, model: ServedModel) -> None:
        """Refuse a request before paying for reading and decoding it when the queue is full."""
        waiting, limit = model.batcher.pending, self.settings.queue_size
        if waiting >= limit:
            raise self.busy(f"{waiting} images are waiting (limit {limit})")

    async def infer(self, model: ServedModel, images: np.ndarray, coupling: bool = False) -> Outputs:
        """The model's outputs for images (k, 1, 28, 28), through its batcher; APIError 503/504."""
        timeout = self.settings.request_timeout_s
        entry = logs.current.get()
        if entry is not None:  # for the access line
            entry.model, entry.version, entry.images = model.name, model.version, len(images)
        try:
            out = await model.batcher.submit(images, coupling, timeout)
        except QueueFullError as exc:
            raise self.busy(str(exc)) from None
        except EngineClosedError as exc:
            raise APIError(503, str(exc), {"Retry-After": "5"}) from None
        except TimeoutError:
            raise APIError(504, f"inference took longer than {timeout} s") from None
        if entry is not None:
            entry.batch = out.batch
        return out

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Load every model (startup fails on a bad one), start their batchers and warm-ups; on exit
        refuse new work, drain the batchers and stop."""
        s = self.settings
        logs.quiet_onnxruntime(s.log_format)
        repo = Repository()
        warm: list[asyncio.Task[None]] = []
        try:
            for directory in model_dirs(s):
                engine = await asyncio.to_thread(Engine.from_settings, s, directory)
                stats = BatchStats(self.metrics.observe_batch)
                model = ServedModel(
                    engine, Batcher(engine, s.max_batch_size, s.max_wait_ms, s.queue_size, stats)
                )
                repo.add(model)
                model.batcher.start()
                warm.append(asyncio.create_task(_warm_up(model, s.max_batch_size)))
            self.models = repo
            yield
        finally:
            self.models = None
            for task in warm:
                task.cancel()
            for model in repo.models.values():
                model.ready = False
                await model.batcher.close()
            for task in warm:
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
