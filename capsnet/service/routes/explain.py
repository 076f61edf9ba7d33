"""Seeing inside the capsules: the routing trace (coupling c_ij of every iteration, as JSON or
heatmaps), the decoder's reconstruction from a class's pose, and the paper's pose-dimension sweeps."""

from __future__ import annotations

import io
import math
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from capsnet.service.errors import APIError, json_response
from capsnet.service.inputs import Preprocess, is_json, poses_from_json
from capsnet.service.render import routing_heatmap
from capsnet.service.routes import ModelDep, StateDep
from capsnet.service.routes.predict import PreprocessQ, prediction_items, read_request_images
from capsnet.service.schemas import (
    IMAGE_BODY_DOC,
    RECONSTRUCT_BODY_DOC,
    UNKNOWN_MODEL,
    PerturbResponse,
    ReconstructResponse,
    RoutingTraceResponse,
)
from capsnet.service.state import ServedModel, State

router = APIRouter()

ClassQ = Annotated[
    int | None, Query(ge=0, description="class whose pose is decoded; default: the predicted one")
]
FormatQ = Annotated[Literal["json", "png"] | None, Query(description="default: png if Accept asks for it")]
ScaleQ = Annotated[int, Query(ge=1, le=16, description="PNG pixels per image pixel")]


def png_bytes(image01: np.ndarray, scale: int = 1) -> bytes:
    """A [0, 1] grayscale array as PNG (white digit on black, like MNIST), nearest-neighbour upscaled."""
    pixels = np.clip(np.rint(image01 * 255.0), 0, 255).astype(np.uint8)
    if scale > 1:
        pixels = np.kron(pixels, np.ones((scale, scale), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


async def request_poses(request: Request, state: State, model: ServedModel, preprocess: Preprocess | None,
                        class_index: int | None) -> tuple[np.ndarray, int]:  # fmt: skip
    """The poses (J, D) to decode, from `{"poses": ...}` JSON or from one image, and the class k."""
    engine = model.engine
    if engine.decoder is None:
        raise APIError(503, "this model has no decoder.onnx")
    J = len(engine.info.labels)
    D = next(int(o["shape"][-1]) for o in engine.info.outputs if o["name"] == "poses")
    poses = await poses_from_json(request, state.settings, J, D) if is_json(request) else None
    if poses is None:
        images = await read_request_images(request, state, model, preprocess)
        if len(images) != 1:
            raise APIError(422, f"this endpoint takes exactly one image, got {len(images)}")
        poses = (await state.infer(model, images))["poses"][0]
    k = choose_class(np.linalg.norm(poses, axis=-1), class_index)
    return np.ascontiguousarray(poses, dtype=np.float32), k


def choose_class(lengths: np.ndarray, class_index: int | None) -> int:
    """The caller's class if it exists, else the longest capsule (the prediction)."""
    if class_index is None:
        return int(lengths.argmax())
    if class_index >= len(lengths):
        raise APIError(422, f"class_index must be below {len(lengths)}")
    return class_index


def wants_png(request: Request, format: str | None) -> bool:
    return format == "png" or (format is None and "image/png" in request.headers.get("accept", ""))


def tile(grid: np.ndarray, gap: int = 1) -> np.ndarray:
    """(rows, cols, H, W) -> one image with `gap` pixels of mid-grey between the tiles."""
    rows, cols, H, W = grid.shape
    out = np.full((rows * (H + gap) - gap, cols * (W + gap) - gap), 0.5, np.float32)
    for r in range(rows):
        for c in range(cols):
            out[r * (H + gap) : r * (H + gap) + H, c * (W + gap) : c * (W + gap) + W] = grid[r, c]
    return out


def routing_summary(coupling: np.ndarray, activations: np.ndarray) -> list[dict[str, Any]]:
    """Per iteration: activation-weighted coupling mass per class and the entropy of the c_i."""
    a = activations / max(float(activations.sum()), 1e-12)  # (N,)
    entropy = -(coupling * np.log(np.clip(coupling, 1e-12, None))).sum(axis=-1)  # (r, N)
    return [
        {
            "iteration": k + 1,
            "class_mass": a @ coupling[k],
            "mean_entropy": float(entropy[k].mean()),
            "weighted_entropy": float(entropy[k] @ a),
        }
        for k in range(coupling.shape[0])
    ]


def aggregate_coupling(coupling: np.ndarray, types: int, grid: list[int], how: str) -> np.ndarray:
    """(r, N, J) -> unchanged, (r, types, J) or (r, rows, cols, J), averaging the other axis."""
    r, _, J = coupling.shape
    by_cell = coupling.reshape(r, types, grid[0], grid[1], J)  # N is (type, row, col) ordered
    if how == "type":
        return np.asarray(by_cell.mean(axis=(2, 3)))
    if how == "position":
        return np.asarray(by_cell.mean(axis=1))
    return coupling


@router.post(
    "/routing-trace",
    response_model=RoutingTraceResponse,
    openapi_extra=IMAGE_BODY_DOC,
    responses={200: {"content": {"image/png": {}}}, **UNKNOWN_MODEL},
    summary="The coupling coefficients c_ij of every routing iteration for one image",
)
async def routing_trace(
    request: Request,
    state: StateDep,
    model: ModelDep,
    preprocess: PreprocessQ = None,
    iterations: Annotated[
        Literal["all", "last"], Query(description="every iteration or only the last")
    ] = "all",
    format: Annotated[Literal["json", "png"], Query(description="png: coupling heatmaps")] = "json",
    class_index: ClassQ = None,
    weighted: Annotated[bool, Query(description="png: weight c_ij by the activation |u_i|")] = False,
    aggregate: Annotated[
        Literal["none", "type", "position"],
        Query(description="average the coupling over positions (`type`) or types (`position`)"),
    ] = "none",
) -> Response:
    images = await read_request_images(request, state, model, preprocess)
    if len(images) != 1:
        raise APIError(422, f"routing-trace takes exactly one image, got {len(images)}")
    out = await state.infer(model, images, coupling=True)
    info = model.engine.info
    coupling, activations = out["coupling"][0], out["primary_activations"][0]  # (r, N, J), (N,)
    summary = routing_summary(coupling, activations)
    if format == "png":
        k = choose_class(out["probabilities"][0], class_index)
        values = coupling[:, :, k] * (activations if weighted else 1.0)  # (r, N)
        what = "c_ij x |u_i|" if weighted else "c_ij"
        titles = [f"iter {s['iteration']}: mass {s['class_mass'][k]:.4f}, H {s['mean_entropy']:.4f}"
                  for s in summary]  # fmt: skip
        rows, cols = info.primary_grid
        legend = f"{what} to class {info.labels[k]}; {info.primary_types} capsule types x {rows}x{cols}"
        png, _ = await run_in_threadpool(routing_heatmap, values, info.primary_grid[0], titles, legend)
        return Response(png, media_type="image/png")
    which = list(range(1, info.routing_iterations + 1))
    if iterations == "last":
        coupling, which = coupling[-1:], which[-1:]
    item = prediction_items(model.engine, out)[0]
    item.update(
        {
            "model": {"name": info.name, "version": info.version},
            "iterations": info.routing_iterations,
            "classes": info.labels,
            "primary_capsules": {
                "count": info.num_primary,
                "types": info.primary_types,
                "grid": info.primary_grid,
                "order": ["type", "row", "col"],
            },
            "coupling_iterations": which,
            "aggregate": aggregate,
            "coupling": np.ascontiguousarray(
                aggregate_coupling(coupling, info.primary_types, info.primary_grid, aggregate)
            ),
            "primary_activations": activations,
            "summary": summary,
        }
    )
    return json_response(item)


@router.post("/reconstruct", response_model=ReconstructResponse, openapi_extra=RECONSTRUCT_BODY_DOC,
             responses={200: {"content": {"image/png": {}}}, **UNKNOWN_MODEL},
             summary="The decoder's reconstruction from the pose of one class")  # fmt: skip
async def reconstruct(
    request: Request,
    state: StateDep,
    model: ModelDep,
    preprocess: PreprocessQ = None,
    class_index: ClassQ = None,
    format: FormatQ = None,
    scale: ScaleQ = 1,
) -> Response:
    poses, k = await request_poses(request, state, model, preprocess, class_index)
    engine = model.engine
    J = len(engine.info.labels)
    mask = np.eye(J, dtype=np.float32)[[k]]
    recon = (await run_in_threadpool(engine.reconstruct, poses[None], mask))[0, 0]
    if wants_png(request, format):
        return Response(png_bytes(recon, scale), media_type="image/png")
    return json_response(
        {
            "class_index": k,
            "label": engine.info.labels[k],
            "length": np.linalg.norm(poses[k]),
            "poses": poses,
            "reconstruction": recon,
        }
    )


@router.post(
    "/perturb",
    response_model=PerturbResponse,
    openapi_extra=RECONSTRUCT_BODY_DOC,
    responses={200: {"content": {"image/png": {}}}, **UNKNOWN_MODEL},
    summary="Pose-dimension sweeps (paper Fig. 4): reconstructions with one dimension tweaked",
)
async def perturb(
    request: Request,
    state: StateDep,
    model: ModelDep,
    preprocess: PreprocessQ = None,
    class_index: ClassQ = None,
    dims: Annotated[str | None, Query(description="comma list of pose dimensions; default: all")] = None,
    low: Annotated[float, Query(ge=-5, le=5)] = -0.25,
    high: Annotated[float, Query(ge=-5, le=5)] = 0.25,
    step: Annotated[float, Query(gt=0, le=10)] = 0.05,
    format: FormatQ = None,
    scale: ScaleQ = 1,
) -> Response:
    poses, k = await request_poses(request, state, model, preprocess, class_index)
    engine = model.engine
    J, D = poses.shape
    try:
        chosen = list(range(D)) if dims is None else [int(d) for d in dims.split(",")]
    except ValueError:
        raise APIError(422, f"dims must be a comma list of integers in [0, {D})") from None
    if not chosen or any(not 0 <= d < D for d in chosen) or len(set(chosen)) != len(chosen):
        raise APIError(422, f"dims must be distinct integers in [0, {D})")
    if high < low:
        raise APIError(422, "high must be >= low")
    steps = (high - low) / step + 1e-6  # a tiny step makes this huge, or inf: check before converting
    if not steps < 41:
        shown = math.floor(steps) + 1 if math.isfinite(steps) else "too many"
        raise APIError(422, f"{shown} sweep values; at most 41 (raise step or narrow the range)")
    n = math.floor(steps) + 1
    values = (low + step * np.arange(n)).astype(np.float32)
    batch = np.repeat(poses[None], len(chosen) * n, axis=0)  # (dims*values, J, D)
    for a, d in enumerate(chosen):
        batch[a * n : (a + 1) * n, k, d] += values
    mask = np.zeros((len(batch), J), np.float32)
    mask[:, k] = 1.0
    recon = await run_in_threadpool(engine.reconstruct, batch, mask)
    grid = recon[:, 0].reshape(len(chosen), n, *recon.shape[2:])  # (dims, values, H, W)
    if wants_png(request, format):
        return Response(png_bytes(tile(grid), scale), media_type="image/png")
    return json_response({"class_index": k, "label": engine.info.labels[k], "dims": chosen,
                          "values": values, "reconstructions": grid})  # fmt: skip
