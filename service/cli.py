"""`capsnet serve`: check the model loads (one clear message if not), then start uvicorn."""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from service.engine import Engine, EngineError
    from service.settings import get_settings

    if args.model_dir is not None:
        os.environ["CAPSNET_MODEL_DIR"] = str(args.model_dir)  # workers read the same settings
    if args.workers:
        os.environ["CAPSNET_WORKERS"] = str(args.workers)  # the gRPC servers of the workers share a port
    os.environ.setdefault("CAPSNET_GRPC_HOST", args.host)  # gRPC listens where HTTP does, unless told
    get_settings.cache_clear()
    s = get_settings()
    logging.getLogger().setLevel(s.log_level.upper())
    try:  # fail before binding the port, with one line instead of a lifespan traceback
        Engine.from_settings(s)
    except EngineError as exc:
        raise SystemExit(f"capsnet serve: {exc}") from None
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=s.workers,  # each worker: its own session, batcher and GIL
        log_level=s.log_level.lower(),
        timeout_graceful_shutdown=30,
    )
