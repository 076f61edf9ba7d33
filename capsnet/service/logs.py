"""Logs an operator can follow: a request ID on every line written while serving a request, one access
line per request, and `CAPSNET_LOG_FORMAT=json` for a log pipeline (one JSON object per line, uvicorn's
lines included; a traceback, for a real server error only, inside the object).

Request IDs: a valid `X-Request-ID` from the client (or the load balancer) is kept, anything else is
replaced by a new one; the ID goes back on every answer and into every log line of the request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID = 128  # longer IDs are replaced, not cut

access_log = logging.getLogger("capsnet.access")


@dataclass
class RequestLog:
    """What the access line says about one request; the handlers fill in the inference fields."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    version: str | None = None
    images: int | None = None
    batch: int | None = None


current: contextvars.ContextVar[RequestLog | None] = contextvars.ContextVar("capsnet_request", default=None)


def valid_request_id(value: bytes) -> bool:
    """Printable ASCII without spaces (what proxies and log pipelines pass unchanged), bounded."""
    return 0 < len(value) <= MAX_REQUEST_ID and all(0x21 <= c <= 0x7E for c in value)


def new_request_id() -> str:
    return os.urandom(12).hex()


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            return value.decode("ascii") if valid_request_id(value) else new_request_id()
    return new_request_id()


def log_access(entry: RequestLog, route: str, status: int, sent: int) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    ms = (time.perf_counter() - entry.started) * 1e3
    fields: dict[str, Any] = {"method": entry.method, "route": route, "status": status,
                              "duration_ms": round(ms, 3), "bytes": sent}  # fmt: skip
    if entry.model is not None:
        fields.update(model=entry.model, version=entry.version, images=entry.images, batch=entry.batch)
    text = f"{entry.method} {route} {status} {ms:.1f} ms {sent} B"
    if entry.model is not None:
        text += f" model={entry.model} images={entry.images} batch={entry.batch}"
    access_log.info(text, extra={"access": fields})


class RequestIdFilter(logging.Filter):
    """Puts the current request's ID (or None outside a request) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        entry = current.get()
        record.request_id = entry.request_id if entry is not None else None
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request {rid}]" if rid else line


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id; the access line's fields;
    a traceback as `exc_info` when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            doc["request_id"] = rid
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            doc.update(access)
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def logging_config(fmt: str, level: str) -> dict[str, Any]:
    """A dictConfig for the root logger, ours and uvicorn's (uvicorn applies it in every worker)."""
    formatter = {"()": JSONFormatter} if fmt == "json" else {"()": TextFormatter}
    handler = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": "capsnet",
        "filters": ["request_id"],
    }
    quiet = {"handlers": ["capsnet"], "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"capsnet": formatter},
        "handlers": {"capsnet": handler},
        "root": {"handlers": ["capsnet"], "level": level.upper()},
        "loggers": {
            "uvicorn": {**quiet, "level": level.upper()},
            "uvicorn.error": {"level": level.upper()},
            # our access line replaces uvicorn's (one line per request, with the route and the model)
            "uvicorn.access": {**quiet, "level": "WARNING"},
        },
    }


def configure(fmt: str, level: str) -> None:
    """Logging for this process: our handler on the root logger; Python warnings and onnxruntime's own
    console logger kept out of a JSON log (onnxruntime reports errors as exceptions, which we log)."""
    import logging.config

    logging.config.dictConfig(logging_config(fmt, level))
    logging.captureWarnings(True)
    quiet_onnxruntime(fmt)


def quiet_onnxruntime(fmt: str) -> None:
    """onnxruntime writes its own console lines (not JSON, not ours): errors only, none in JSON mode
    (it reports errors as exceptions too, which we log). Each worker process calls this."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4 if fmt == "json" else 3)
