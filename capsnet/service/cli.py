"""`capsnet serve`: check the settings may listen where asked (capsnet.service.auth) and every model
loads (one clear line if not), then start uvicorn with our logging, HTTP limits and, with several
workers, one shared folder for their metrics and model repository."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from capsnet.service.metrics import MULTIPROCESS_DIR
from capsnet.service.workers import SHARED_DIR_ENV

if TYPE_CHECKING:
    from capsnet.service.settings import Settings

log = logging.getLogger(__name__)


def check_models(settings: Settings) -> list[str]:
    """Open every model directory the settings name (CAPSNET_MODEL_DIR, CAPSNET_MODEL_DIRS): the names,
    or EngineError for the first missing, broken or duplicate one."""
    from capsnet.service.engine import Engine, EngineError
    from capsnet.service.state import model_dirs

    names: dict[str, str] = {}
    for k, directory in enumerate(model_dirs(settings)):
        try:
            name = Engine.from_settings(settings, directory, beside=k > 0).info.name
        except EngineError as exc:
            if k == 0:  # the default model: its message names its files
                raise
            raise EngineError(f"CAPSNET_MODEL_DIRS entry {directory}: {exc}") from None
        if name in names:
            raise EngineError(f"{directory} and {names[name]} both carry the model name {name!r}")
        names[name] = str(directory)
    return list(names)


def serve(*, host: str, port: int, workers: int | None, model_dir: Path | None) -> None:
    """`capsnet serve`; `workers` and `model_dir` override CAPSNET_WORKERS and CAPSNET_MODEL_DIR."""
    import uvicorn

    from capsnet.service.auth import startup_problem
    from capsnet.service.engine import EngineError
    from capsnet.service.logs import configure, logging_config
    from capsnet.service.server import LimitedHttpToolsProtocol
    from capsnet.service.settings import get_settings

    if model_dir is not None:
        os.environ["CAPSNET_MODEL_DIR"] = str(model_dir)  # workers read the same settings
    os.environ.setdefault("CAPSNET_GRPC_HOST", host)  # gRPC listens where HTTP does, unless told
    get_settings.cache_clear()
    s = get_settings()
    configure(s.log_format, s.log_level)
    if (problem := startup_problem(s, host)) is not None:
        raise SystemExit(f"capsnet serve: {problem}")
    try:  # fail before binding the port, with one line instead of a lifespan traceback
        check_models(s)
    except EngineError as exc:
        raise SystemExit(f"capsnet serve: {exc}") from None
    workers = workers or s.workers  # each worker: its own sessions, batchers and GIL
    env = {"CAPSNET_WORKERS": str(workers)}  # what the workers read, set while the server runs
    if workers > 1:
        shared = tempfile.mkdtemp(prefix="capsnet-")
        env |= {SHARED_DIR_ENV: shared, MULTIPROCESS_DIR: os.path.join(shared, "metrics")}
        os.makedirs(env[MULTIPROCESS_DIR])
    with _environ(env):
        uvicorn.run(
            "capsnet.service.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            http=LimitedHttpToolsProtocol,
            log_config=logging_config(s.log_format, s.log_level),
            log_level=s.log_level.lower(),
            access_log=False,  # ours (capsnet.access) has the route, the model and the request ID
            timeout_keep_alive=s.http_keep_alive_s,
            timeout_graceful_shutdown=30,
        )


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Environment variables for the server's lifetime (its workers inherit them), then as they were;
    the shared folder, if any, is removed."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if SHARED_DIR_ENV in values:
            shutil.rmtree(values[SHARED_DIR_ENV], ignore_errors=True)
