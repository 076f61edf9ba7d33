"""Request and response models: they drive the OpenAPI document and validate JSON input."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, for a human")


class ImagesRequest(BaseModel):
    images: list[list[list[float]]] = Field(
        description="28x28 arrays of floats in [0, 1], white digit on black like MNIST", min_length=1
    )


class ModelRef(BaseModel):
    name: str
    version: str


class Prediction(BaseModel):
    class_index: int
    label: str
    probability: float = Field(description="length of the predicted class's capsule")
    probabilities: list[float] = Field(
        description="capsule lengths in class order; independent, not summing to 1"
    )
    poses: list[list[float]] = Field(description="the 10 digit capsules v_j, 16-D each")


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]


class PrimaryCapsules(BaseModel):
    count: int
    types: int
    grid: list[int]
    order: list[str]


class IterationSummary(BaseModel):
    iteration: int = Field(description="1-based routing iteration")
    class_mass: list[float] = Field(
        description="per class j: Σ_i a_i c_ij / Σ_i a_i, the share of the primary capsules' activation "
        "a_i = |u_i| sent to parent j"
    )
    mean_entropy: float = Field(description="mean over i of the entropy of c_i in nats (ln 10 = uniform)")
    weighted_entropy: float = Field(description="the same mean weighted by the activations a_i")


class RoutingTraceResponse(Prediction):
    model: ModelRef
    iterations: int
    classes: list[str]
    primary_capsules: PrimaryCapsules
    coupling_iterations: list[int] = Field(description="which iterations `coupling` holds (1-based)")
    aggregate: Literal["none", "type", "position"]
    coupling: list[list[list[float]]] | list[list[list[list[float]]]] = Field(
        description="c_ij per iteration: (iterations, 1152, classes) without aggregation, "
        "(iterations, types, classes) by type, (iterations, rows, cols, classes) by position"
    )
    primary_activations: list[float] = Field(description="a_i = |u_i| for the primary capsules")
    summary: list[IterationSummary]


class ReconstructRequest(BaseModel):
    poses: list[list[float]] = Field(description="10 pose vectors of 16 numbers (e.g. from /predict, edited)")


class ReconstructResponse(BaseModel):
    class_index: int = Field(description="the class whose pose was decoded")
    label: str
    length: float = Field(description="length of that class's capsule")
    poses: list[list[float]]
    reconstruction: list[list[float]] = Field(description="28x28 in [0, 1], white on black like MNIST")


class PerturbResponse(BaseModel):
    class_index: int
    label: str
    dims: list[int] = Field(description="the pose dimensions swept, one row each")
    values: list[float] = Field(description="the offsets added to that dimension, one column each")
    reconstructions: list[list[list[list[float]]]] = Field(description="(dims, values, 28, 28)")


class Health(BaseModel):
    status: str
    detail: str | None = None


class Metadata(BaseModel):
    name: str
    version: str
    labels: list[str]
    routing_iterations: int
    primary_capsules: PrimaryCapsules
    inputs: list[dict[str, object]]
    outputs: list[dict[str, object]]
    providers: list[str] = Field(description="execution providers the ONNX session really uses")
    decoder: bool
    model_card: dict[str, object]
    onnx_metadata: dict[str, str]
    batching: dict[str, float]


def error_responses(model: type[BaseModel], texts: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """FastAPI's `responses=` for error statuses: each one's body model and what it means."""
    return {code: {"model": model, "description": text} for code, text in texts.items()}
