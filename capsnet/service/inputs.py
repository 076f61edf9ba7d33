"""Request bodies -> validated arrays: multipart `file` / `files`, a raw image body, JSON
{"images": [...]} or {"poses": [...]}. Every mistake is an APIError with its status (400, 413, 415,
422) and a message for a human; nothing here knows routes or models.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from capsnet.service.engine import available_cores
from capsnet.service.errors import APIError
from capsnet.service.preprocess import Mode, PreprocessError, header_pixels, preprocess_bytes, validate_array
from capsnet.service.settings import Settings

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


# Where an upload is preprocessed. A digit-sized image costs less on the event loop than the hand-off
# to a thread and back; a photo goes to a thread so that the loop keeps reading other requests. A
# request alone in the server has no other request for the loop to read: a scan-sized upload is
# preprocessed there too, which spares it the two hand-offs and the move to a thread that last ran on
# the other core, with none of the caches warm.
INLINE_PIXELS = 64 * 64  # per request, as the images' headers announce them
INLINE_ALONE_PIXELS = 256 * 256  # ... when it is the only request in progress: a few ms at most
INLINE_DECODE_BYTES = 4096  # preprocess=none: a 28x28 image or a refusal (its size is checked first)


async def read_images(
    request: Request, settings: Settings, preprocess: Preprocess, alone: Callable[[], bool]
) -> np.ndarray:
    """The request's images as float32 (k, 1, 28, 28), or an APIError. `alone`: whether this is the
    only request in progress once its body is read (State.alone)."""
    ctype = content_type(request)
    body = await read_body(request, settings.max_upload_bytes)
    if ctype == "multipart/form-data":
        blobs = await _multipart_blobs(request, settings)
        arrays = await _preprocessed(blobs, preprocess, settings, alone())
    elif ctype.startswith(IMAGE_TYPES):
        arrays = await _preprocessed([body], preprocess, settings, alone())
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


async def _preprocessed(
    blobs: list[bytes], preprocess: Preprocess, settings: Settings, alone: bool
) -> list[np.ndarray]:
    """Each upload preprocessed: here when they are small, else in one job on the preprocessing threads."""
    work = functools.partial(_preprocess_all, blobs, preprocess, settings.max_image_pixels)
    try:
        if _small(blobs, preprocess, INLINE_ALONE_PIXELS if alone else INLINE_PIXELS):
            return work()
        loop = asyncio.get_running_loop()
        # the request's context (its ID in the log lines) goes along, as starlette's threadpool does it
        return await loop.run_in_executor(_preprocess_pool(), contextvars.copy_context().run, work)
    except PreprocessError as exc:
        raise APIError(exc.status_code, exc.detail) from None


def _preprocess_all(blobs: list[bytes], preprocess: Preprocess, max_pixels: int) -> list[np.ndarray]:
    return [preprocess_bytes(b, mode=preprocess, max_pixels=max_pixels) for b in blobs]


def _small(blobs: list[bytes], preprocess: Preprocess, inline_pixels: int) -> bool:
    if preprocess == "none" and sum(map(len, blobs)) <= INLINE_DECODE_BYTES:
        return True
    total = 0
    for blob in blobs:
        pixels = header_pixels(blob)
        if pixels is None:  # a format whose header we do not read (TIFF, WebP): a thread's job
            return False
        total += pixels
    return total <= inline_pixels


@functools.cache
def _preprocess_pool() -> ThreadPoolExecutor:
    """The threads photos are preprocessed on: one per core the process may use. (Starlette's
    threadpool lets 40 run at once: under concurrent uploads they queue for the GIL, each photo takes
    several times its own time, and each holds its decoded pixels meanwhile.)"""
    return ThreadPoolExecutor(max_workers=available_cores(), thread_name_prefix="capsnet-preprocess")


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
