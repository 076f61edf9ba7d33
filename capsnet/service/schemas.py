"""Request and response models: they drive the OpenAPI document and validate JSON input."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from capsnet.service.preprocess import Mode


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


class CpuFeatures(BaseModel):
    """The host CPU as onnxruntime's kernels see it: which int8 figures apply here (docs/performance.md)."""

    model: str
    present: list[str] = Field(description="the vector extensions that decide the kernels, of those known")
    missing: list[str]
    int8_kernels: str = Field(description="the int8 GEMM family onnxruntime picks from these features")
    vnni: bool = Field(description="VNNI or AMX: exact 32-bit int8 sums, where int8 pays")
    int8_saturates: bool = Field(
        description="int8 sums saturate in 16 bits here: only files with 7-bit weights are served at int8"
    )


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


class ModelSummary(BaseModel):
    name: str = Field(description="what `?model=` takes")
    version: str
    labels: list[str] = Field(description="the class names, in class order")
    preprocess: Mode = Field(description="the model's default `preprocess`")
    routing_iterations: int
    decoder: bool = Field(description="whether /reconstruct and /perturb can draw for it")
    default: bool = Field(description="the model of requests without `?model=`")
    ready: bool = Field(description="warmed up (else its requests answer 503)")


class Metadata(BaseModel):
    name: str
    version: str
    labels: list[str]
    preprocess: Mode = Field(
        description="the preprocessing of a request that names none: the metadata key `preprocess` "
        "of the ONNX file, `mnist` when it has none"
    )
    routing_iterations: int
    primary_capsules: PrimaryCapsules
    inputs: list[dict[str, object]]
    outputs: list[dict[str, object]]
    providers: list[str] = Field(description="execution providers the ONNX session really uses")
    cuda_options: dict[str, str] = Field(
        description="the CUDA provider's options (arena growth, memory limit, cuDNN search); empty on the CPU"
    )
    precision: Literal["fp32", "fp16", "int8"] = Field(description="CAPSNET_PRECISION the classifier runs at")
    classifier_file: str = Field(description="the classifier file in use: capsnet.onnx, -fp16 or -int8")
    cpu: CpuFeatures
    decoder: bool
    model_card: dict[str, object]
    onnx_metadata: dict[str, str]
    batching: dict[str, float]
    models: list[ModelSummary] = Field(description="every model served, the default one first")
    model_control: Literal["none", "explicit"] = Field(
        description="CAPSNET_MODEL_CONTROL: `none`, load and unload refused; `explicit`, allowed with the "
        "admin key (docs/reliability.md)"
    )


def error_responses(model: type[BaseModel], texts: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """FastAPI's `responses=` for error statuses: each one's body model and what it means."""
    return {code: {"model": model, "description": text} for code, text in texts.items()}


# REST: the error statuses and request bodies as the OpenAPI document shows them

REST_ERRORS = error_responses(
    ErrorResponse,
    {
        400: "corrupt, truncated or empty image, malformed body",
        413: "body, image (pixels) or image count over the limit",
        415: "unsupported Content-Type or image format",
        422: "wrong JSON shape or values (NaN, out of [0, 1]), bad query",
        503: "model not ready, or queue full (see Retry-After)",
        504: "inference timed out",
    },
)

# the answer of the routes that take `?model=` (ModelDep) to a name the server does not serve
UNKNOWN_MODEL = error_responses(ErrorResponse, {404: "unknown model: `?model=` names no model served"})

IMAGE_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "one image"},
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "several images, answered in order",
                        },
                    },
                    "anyOf": [{"required": ["file"]}, {"required": ["files"]}],
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": ImagesRequest.model_json_schema()},
        },
    }
}

RECONSTRUCT_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            **IMAGE_BODY_DOC["requestBody"]["content"],
            "application/json": {"schema": {"oneOf": [ImagesRequest.model_json_schema(),
                                                      ReconstructRequest.model_json_schema()]}},
        },
    }
}  # fmt: skip


# The Open Inference Protocol (v2): requests are parsed by hand (the binary extension is not JSON);
# these models drive its part of the OpenAPI document


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="e.g. FP32")
    shape: list[int] = Field(description="-1 for the dynamic batch axis")


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferInput(BaseModel):
    name: str = Field(description="`image`")
    shape: list[int] = Field(description="[B, 1, 28, 28]")
    datatype: str = Field(description="FP32")
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_size": bytes} for binary data')
    data: list[Any] | None = Field(None, description="row-major values in [0, 1], flat or nested")


class RequestedOutput(BaseModel):
    name: str = Field(description="`probabilities`, `poses`, `coupling` or `primary_activations`")
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data": true} for binary data')


class InferRequestDoc(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_output": true}')
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = Field(None, description="default: every output")


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str = Field(description="the version being served; empty when unavailable")
    state: Literal["READY", "UNAVAILABLE"]
    reason: str = Field(description="why it is unavailable (unloaded, warming up); empty when ready")


class V2ErrorResponse(BaseModel):
    error: str


V2_ERRORS = error_responses(
    V2ErrorResponse,
    {
        400: "malformed request: JSON, datatype, shape, data length or values (NaN, out of [0, 1])",
        404: "unknown model or version",
        413: "body or batch over the limit",
        503: "model not ready, or queue full (see Retry-After)",
        504: "inference timed out",
    },
)
MANAGEMENT_ERRORS = error_responses(
    V2ErrorResponse,
    {
        401: "explicit model control: missing or wrong admin key (CAPSNET_ADMIN_KEY)",
        403: "model control is off (CAPSNET_MODEL_CONTROL=none, the default)",
    },
)
INFER_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "JSON; or, with the `Inference-Header-Content-Length` header, that many bytes of "
        "JSON followed by the binary inputs",
        "content": {
            "application/json": {"schema": InferRequestDoc.model_json_schema()},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
