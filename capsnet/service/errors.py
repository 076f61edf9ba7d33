"""The one error type of the serving domain, and the JSON answers every layer sends.

An `APIError` carries an HTTP status and a message for a human. The REST routes answer it as
`{"detail": ...}`, the Open Inference Protocol's routes as `{"error": ...}` (as that protocol says).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

V2_PREFIX = "/v2"


class APIError(Exception):
    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code, self.detail, self.headers = status_code, detail, headers


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_response(
    path: str, status_code: int, detail: str, headers: dict[str, str] | None = None
) -> Response:
    """{"error"} on the Open Inference Protocol's paths, {"detail"} everywhere else."""
    return json_response({"error": detail} if is_v2(path) else {"detail": detail}, status_code, headers)
