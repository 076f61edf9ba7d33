"""Health (liveness, readiness), the models' metadata and the Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from capsnet.service.cpu import host
from capsnet.service.errors import json_response
from capsnet.service.routes import ModelDep, StateDep
from capsnet.service.schemas import UNKNOWN_MODEL, Health, Metadata
from capsnet.service.state import ServedModel

router = APIRouter()


@router.get("/health/live", response_model=Health)
async def live() -> Response:
    return json_response({"status": "alive"})


@router.get("/health/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(state: StateDep) -> Response:
    if (why := state.not_ready()) is None:
        return json_response({"status": "ready"})
    return json_response({"status": "starting", "detail": why}, 503, {"Retry-After": "1"})


def model_entry(model: ServedModel, default: ServedModel | None) -> dict[str, Any]:
    """What the web page's model picker needs of one served model."""
    info = model.engine.info
    return {
        "name": info.name,
        "version": info.version,
        "labels": info.labels,
        "preprocess": info.preprocess,
        "routing_iterations": info.routing_iterations,
        "decoder": model.engine.decoder is not None,
        "default": model is default,
        "ready": model.ready,
    }


@router.get("/metadata", response_model=Metadata, responses=UNKNOWN_MODEL)
async def metadata(state: StateDep, model: ModelDep) -> Response:
    engine = model.engine
    info = engine.info
    s = state.settings
    repo = state.repository()
    return json_response(
        {
            "name": info.name,
            "version": info.version,
            "labels": info.labels,
            "preprocess": info.preprocess,
            "routing_iterations": info.routing_iterations,
            "primary_capsules": {
                "count": info.num_primary,
                "types": info.primary_types,
                "grid": info.primary_grid,
                "order": ["type", "row", "col"],
            },
            "inputs": info.inputs,
            "outputs": info.outputs,
            "providers": engine.providers,
            "cuda_options": engine.cuda_options,
            "precision": engine.precision,
            "classifier_file": engine.classifier_file,
            "cpu": host(),
            "decoder": engine.decoder is not None,
            "model_card": info.card,
            "onnx_metadata": info.metadata,
            "batching": {
                "max_batch_size": s.max_batch_size,
                "max_wait_ms": s.max_wait_ms,
                "queue_size": s.queue_size,
            },
            "models": [model_entry(m, repo.default) for m in repo.models.values()],
            "model_control": s.model_control,
        }
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.scrape(), media_type=CONTENT_TYPE_LATEST)
