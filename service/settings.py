"""Service configuration from environment variables with the prefix CAPSNET_."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "capsnet-mnist"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAPSNET_", protected_namespaces=())

    model_dir: Path = Field(SHIPPED_MODEL, description="directory holding capsnet.onnx (+ decoder.onnx)")
    model_dirs: str = Field(
        "", description="comma list of more model directories, served by name on the /v2 paths"
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
    intra_op_threads: int = Field(0, ge=0, description="ORT intra-op threads, 0 = one per core")
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
    api_key: SecretStr | None = Field(None, description="if set, requests need `Authorization: Bearer <key>`")
    open_health: bool = Field(True, description="with an API key: /health/* stay open (probes)")
    open_metrics: bool = Field(True, description="with an API key: /metrics stays open (scrapers)")
    cors_origins: str = Field("", description="comma list of allowed browser origins; empty = CORS off")


@lru_cache
def get_settings() -> Settings:
    return Settings()
