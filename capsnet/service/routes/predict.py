"""POST /predict: images in, capsule lengths (the class probabilities) and poses out."""

from __future__ import annotations

import re
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.responses import Response
from starlette.types import Scope

from capsnet.service.engine import Engine
from capsnet.service.errors import json_response
from capsnet.service.inputs import Preprocess, read_images
from capsnet.service.middleware import FastRoute
from capsnet.service.preprocess import MODES
from capsnet.service.routes import ModelDep, StateDep
from capsnet.service.schemas import IMAGE_BODY_DOC, UNKNOWN_MODEL, PredictResponse
from capsnet.service.state import ServedModel, State

router = APIRouter()

PreprocessQ = Annotated[
    Preprocess | None,
    Query(
        description="how an uploaded image becomes the model's 28x28 input (JSON `images` are taken as "
        "they are). `mnist`: a photo or scan of a digit brought to MNIST form (inverted when the paper is "
        "light, background and specks removed, the digit fitted into 20x20 and centred by its centre of "
        "mass); `fashion`: a product photo brought to Fashion-MNIST form (Zalando's procedure: the edges "
        "close to the corners' grey trimmed, the longest side resized to 28, the short side extended to 28 "
        "centred, negated to bright on black, 8-bit grey); `none`: a 28x28 image taken as it is. Default: "
        "the model's own (`preprocess` in /metadata): `fashion` for Fashion-MNIST exports, `mnist` for "
        "MNIST exports and models whose metadata names none, such as the shipped capsnet-mnist"
    ),
]


async def read_request_images(
    request: Request, state: State, model: ServedModel, preprocess: Preprocess | None
) -> np.ndarray:
    """The request's images (k, 1, 28, 28) for `model` (`preprocess`: default the model's own);
    refused first if its queue is full."""
    state.admit(model)
    with model.batcher.arriving():
        mode = preprocess or model.engine.info.preprocess
        return await read_images(request, state.settings, mode, state.alone)


def prediction_items(engine: Engine, out: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One answer per image; numpy values as they are (orjson writes float32 as float32)."""
    probs, poses = out["probabilities"], out["poses"]
    best = probs.argmax(axis=1)
    labels = engine.info.labels
    return [
        {
            "class_index": int(c),
            "label": labels[c],
            "probability": probs[i, c],
            "probabilities": probs[i],
            "poses": poses[i],
        }
        for i, c in enumerate(best)
    ]


async def answer(
    request: Request, state: State, model: ServedModel, preprocess: Preprocess | None
) -> Response:
    images = await read_request_images(request, state, model, preprocess)
    out = await state.infer(model, images)
    return json_response(
        {
            "model": {"name": model.name, "version": model.version},
            "predictions": prediction_items(model.engine, out),
        }
    )


@router.post(
    "/predict",
    response_model=PredictResponse,
    openapi_extra=IMAGE_BODY_DOC,
    responses=UNKNOWN_MODEL,
    summary="Classify one or more images",
)
async def predict(
    request: Request, state: StateDep, model: ModelDep, preprocess: PreprocessQ = None
) -> Response:
    return await answer(request, state, model, preprocess)


# -- the fast lane: the query strings made of `model=NAME` and `preprocess=MODE`, each at most once, in
# either order; any other (an escaped name, an unknown mode, another parameter) goes through FastAPI's
# validation of `predict`. The handler answers the same: the same model lookup, the same `answer`.

FAST_PARAMS = {b"model", b"preprocess"}
FAST_MODES: dict[bytes, Preprocess] = {m.encode(): m for m in MODES}
FAST_NAME = re.compile(rb"[A-Za-z0-9._-]+")  # a name that needs no percent-decoding


def fast_query(query: bytes) -> tuple[str | None, Preprocess | None] | None:
    """(model, preprocess) of a query string the fast lane takes, else None."""
    if not query:
        return None, None
    found: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        key, eq, value = part.partition(b"=")
        if not eq or key not in FAST_PARAMS or key in found:
            return None
        found[key] = value
    mode = found.get(b"preprocess")
    if mode is not None and mode not in FAST_MODES:
        return None
    name = found.get(b"model")
    if name is not None and not FAST_NAME.fullmatch(name):
        return None
    return (name.decode() if name is not None else None), (FAST_MODES[mode] if mode is not None else None)


def fast_route(scope: Scope) -> FastRoute | None:
    if scope["path"] != "/predict" or (query := fast_query(scope["query_string"])) is None:
        return None
    name, preprocess = query

    async def handler(request: Request, state: State) -> Response:
        return await answer(request, state, state.model(name), preprocess)

    return handler, "/predict"
