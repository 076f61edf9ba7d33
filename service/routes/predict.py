"""POST /predict: images in, capsule lengths (the class probabilities) and poses out."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.responses import Response
from starlette.types import Scope

from service.engine import Engine
from service.errors import json_response
from service.inputs import Preprocess, read_images
from service.middleware import FastRoute
from service.routes import ModelDep, StateDep
from service.schemas import IMAGE_BODY_DOC, PredictResponse
from service.state import ServedModel, State

router = APIRouter()

PreprocessQ = Annotated[
    Preprocess,
    Query(
        description="`mnist`: bring a photo/scan to MNIST form; `none`: the image already is 28x28 MNIST-like"
    ),
]


async def read_request_images(
    request: Request, state: State, model: ServedModel, preprocess: Preprocess
) -> np.ndarray:
    """The request's images (k, 1, 28, 28) for `model`; refused first if its queue is full."""
    state.admit(model)
    with model.batcher.arriving():
        return await read_images(request, state.settings, preprocess)


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


async def answer(request: Request, state: State, model: ServedModel, preprocess: Preprocess) -> Response:
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
    summary="Classify one or more images",
)
async def predict(
    request: Request, state: StateDep, model: ModelDep, preprocess: PreprocessQ = "mnist"
) -> Response:
    return await answer(request, state, model, preprocess)


def _fast(preprocess: Preprocess) -> FastRoute:
    async def handler(request: Request, state: State) -> Response:
        return await answer(request, state, state.default_model(), preprocess)

    return handler, "/predict"


# The query strings the fast lane takes; any other goes through FastAPI's validation of `predict`.
FAST = {b"": _fast("mnist"), b"preprocess=mnist": _fast("mnist"), b"preprocess=none": _fast("none")}


def fast_route(scope: Scope) -> FastRoute | None:
    return FAST.get(scope["query_string"]) if scope["path"] == "/predict" else None
