"""Service configuration from environment variables with the prefix CAPSNET_."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _shipped_model() -> Path:
    """Where the shipped model is: inside the installed data package `capsnet.models` (a wheel, or an
    editable install that maps it to models/ in the checkout); in a checkout on sys.path without an
    install, the checkout's models/. The container installs no model package and sets
    CAPSNET_MODEL_DIR instead."""
    try:
        return Path(str(resources.files("capsnet.models") / "capsnet-mnist"))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "models" / "capsnet-mnist"


SHIPPED_MODEL = _shipped_model()


def shipped_models() -> list[Path]:
    """Every model shipped beside SHIPPED_MODEL (a folder of the same package holding a capsnet.onnx),
    the default one first, then by name: what a server started with the defaults serves."""
    folder = SHIPPED_MODEL.parent
    others = (
        sorted(p for p in folder.iterdir() if p.name != SHIPPED_MODEL.name and (p / "capsnet.onnx").is_file())
        if folder.is_dir()
        else []
    )
    return [SHIPPED_MODEL, *others]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAPSNET_", protected_namespaces=())

    model_dir: Path = Field(SHIPPED_MODEL, description="directory holding capsnet.onnx (+ decoder.onnx)")
    model_dirs: str | None = Field(
        None,
        description="comma list of more model directories, served by name (`?model=`, the /v2 paths); "
        "unset: the other shipped models, when CAPSNET_MODEL_DIR is the shipped one; empty: none",
    )
    providers: str = Field(
        "auto", description="'auto' (CUDA when usable, else CPU) or a comma list of ORT providers"
    )
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "EXHAUSTIVE", description="CUDA provider: how cuDNN picks convolution algorithms (once, at warm-up)"
    )
    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp32",
        description="classifier: capsnet.onnx (fp32), capsnet-fp16.onnx (from `capsnet fp16`; for GPUs) "
        "or capsnet-int8.onnx (from `capsnet quantize`; for CPUs)",
    )
    require_gpu: bool = Field(False, description="fail startup unless the CUDA provider is really used")
    gpu_mem_limit_mb: int = Field(
        0, ge=0, description="CUDA provider: most device memory its arena may take, MiB (0 = no limit)"
    )
    gpu_arena_extend: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kSameAsRequested",
        description="CUDA provider: how its memory arena grows (kSameAsRequested: no slack)",
    )
    intra_op_threads: int = Field(0, ge=0, description="ORT intra-op threads, 0 = one per core")
    parallel_batches: int = Field(
        0,
        ge=0,
        description="CPU provider: batches run at once, each on one core while another runs (0 = one per "
        "core; 1 = one batch at a time on all cores)",
    )
    intra_op_spinning: bool = Field(
        False, description="ORT intra-op threads spin-wait between runs (burns the cores the HTTP side needs)"
    )
    max_batch_size: int = Field(64, ge=1, description="most images in one inference batch")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits for more requests")
    queue_size: int = Field(1024, ge=1, description="most images waiting; beyond it 503 + Retry-After")
    max_in_flight: int = Field(
        128, ge=1, description="most POST requests being read, decoded or inferred at once (503 beyond)"
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest request body (413)")
    max_image_pixels: int = Field(25_000_000, ge=1, description="largest decoded image (413)")
    max_images: int = Field(64, ge=1, description="most images in one request (413)")
    request_timeout_s: float = Field(30.0, gt=0, description="inference wait before 504")
    workers: int = Field(1, ge=1, description="uvicorn worker processes (`capsnet serve --workers` wins)")
    log_level: str = Field("info", description="logging level")
    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object per log line (uvicorn's too), for log pipelines"
    )
    opentelemetry: bool = Field(
        False, description="FastAPI's own OpenTelemetry spans, metrics and logs (needs a configured provider)"
    )
    http_max_header_bytes: int = Field(
        65536, ge=1024, description="largest request header block; beyond it 431 and the connection closes"
    )
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="a request head must arrive within this (408 and close)"
    )
    http_body_timeout_s: float = Field(
        60.0, gt=0, description="a request body must arrive within this after its head (connection closed)"
    )
    http_keep_alive_s: int = Field(5, ge=1, description="an idle kept-alive connection is closed after this")
    api_key: SecretStr | None = Field(None, description="if set, requests need `Authorization: Bearer <key>`")
    model_control: Literal["none", "explicit"] = Field(
        "none",
        description="`none`: the models the server started with, load and unload refused (403); `explicit`: "
        "load and unload over HTTP and gRPC, with CAPSNET_ADMIN_KEY",
    )
    admin_key: SecretStr | None = Field(
        None,
        description="explicit model control: load and unload need `Authorization: Bearer <key>` (not the API "
        "key); without it the server starts on loopback only",
    )
    open_health: bool = Field(True, description="with an API key: /health/* stay open (probes)")
    open_metrics: bool = Field(True, description="with an API key: /metrics stays open (scrapers)")
    cors_origins: str = Field("", description="comma list of allowed browser origins; empty = CORS off")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="Open Inference Protocol over gRPC on this port; 0 = off"
    )
    grpc_host: str = Field(
        "", description="gRPC listen address; empty = `capsnet serve --host` (127.0.0.1 without it)"
    )
    grpc_max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest gRPC message in or out (RESOURCE_EXHAUSTED beyond)"
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
