"""Request bodies -> validated arrays: multipart `file` / `files`, a raw image body, JSON
{"images": [...]} or {"poses": [...]}. Every mistake is an APIError with its status (400, 413, 415,
422) and a message for a human; nothing here knows routes or models.
"""

from __future__ import annotations

import math

import numpy as np
import orjson
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from service.errors import APIError
from service.preprocess import Mode, PreprocessError, preprocess_bytes, validate_array
from service.settings import Settings

IMAGE_TYPES = ("image/", "application/octet-stream")
Preprocess = Mode


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_json(request: Request) -> bool:
    ctype = content_type(request)
    return ctype == "application/json" or ctype.endswith("+json")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise APIError(413, f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # let request.form() parse what we already read
    return body


INLINE_DECODE_BYTES = 4096  # a 28x28 PNG is about 300 bytes


async def read_images(request: Request, settings: Settings, preprocess: Preprocess) -> np.ndarray:
    """The request's images as float32 (k, 1, 28, 28), or an APIError."""
    ctype = content_type(request)
    body = await read_body(request, settings.max_upload_bytes)
    if ctype == "multipart/form-data":
        blobs = await _multipart_blobs(request, settings)
        arrays = [await _decode(b, preprocess, settings) for b in blobs]
    elif ctype.startswith(IMAGE_TYPES):
        arrays = [await _decode(body, preprocess, settings)]
    elif ctype == "application/json" or ctype.endswith("+json"):
        arrays = _json_arrays(body, settings)
    else:
        raise APIError(
            415,
            f"unsupported Content-Type {ctype or '(none)'!r}: send multipart/form-data (field `file` or "
            '`files`), an image body (image/png, image/jpeg, ...) or application/json {"images": [...]}',
        )
    return np.stack(arrays)[:, None].astype(np.float32, copy=False)


async def _multipart_blobs(request: Request, settings: Settings) -> list[bytes]:
    try:
        form = await request.form(max_files=settings.max_images, max_fields=settings.max_images)
    except StarletteHTTPException as exc:  # python-multipart / starlette limits and parse errors
        status = 413 if "Too many" in str(exc.detail) else 400
        raise APIError(status, f"multipart body rejected: {exc.detail}") from None
    except Exception as exc:
        raise APIError(400, f"malformed multipart body: {type(exc).__name__}") from None
    try:
        parts = form.getlist("file") + form.getlist("files")
        uploads = [p for p in parts if isinstance(p, UploadFile)]
        if len(uploads) != len(parts):
            raise APIError(422, "the `file`/`files` fields must be file uploads, not text")
        if not uploads:
            raise APIError(422, "multipart body has no `file` or `files` field")
        if len(uploads) > settings.max_images:
            raise APIError(413, f"{len(uploads)} images in one request; the limit is {settings.max_images}")
        return [await u.read() for u in uploads]
    finally:
        await form.close()


async def _decode(data: bytes, preprocess: Preprocess, settings: Settings) -> np.ndarray:
    try:
        if preprocess == "none" and len(data) <= INLINE_DECODE_BYTES:
            # A small body already in MNIST form decodes in tens of microseconds, less than the hop to a
            # worker thread costs (+10 % requests/s at concurrency 32 on 2 cores, bench/bench.py); the
            # header's size is checked before any pixel is decoded, so nothing big decodes here.
            return preprocess_bytes(data, mode=preprocess, max_pixels=settings.max_image_pixels)
        return await run_in_threadpool(
            preprocess_bytes, data, mode=preprocess, max_pixels=settings.max_image_pixels
        )
    except PreprocessError as exc:
        raise APIError(exc.status_code, exc.detail) from None


def _json_arrays(body: bytes, settings: Settings) -> list[np.ndarray]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise APIError(422, f"invalid JSON: {exc.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise APIError(422, 'JSON body must be an object {"images": [28x28 arrays of floats in [0, 1]]}')
    images = doc["images"]
    if not images:
        raise APIError(422, "`images` is empty")
    if len(images) > settings.max_images:
        raise APIError(413, f"{len(images)} images in one request; the limit is {settings.max_images}")
    out = []
    for k, img in enumerate(images):
        try:
            out.append(validate_array(img))
        except PreprocessError as exc:
            raise APIError(exc.status_code, f"images[{k}]: {exc.detail}") from None
    return out


async def poses_from_json(request: Request, settings: Settings, classes: int, dim: int) -> np.ndarray | None:
    """`{"poses": [classes x 16]}` -> float32 array; None when the JSON holds images instead."""
    body = await read_body(request, settings.max_upload_bytes)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise APIError(422, f"invalid JSON: {exc.msg}") from None
    if not (isinstance(doc, dict) and "poses" in doc):
        return None
    raw = doc["poses"]

    def finite(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= 10

    rows_ok = isinstance(raw, list) and len(raw) == classes
    ok = rows_ok and all(isinstance(row, list) and len(row) == dim and all(map(finite, row)) for row in raw)
    if not ok:
        raise APIError(422, f"`poses` must be {classes} rows of {dim} finite numbers in [-10, 10]")
    return np.asarray(raw, dtype=np.float32)
