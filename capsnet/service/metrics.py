"""Prometheus metrics: HTTP requests by route template, and every inference metric by model name (the
version is in `capsnet_model_info`, so a reload adds no series per version to the others).

With several workers (`capsnet serve --workers N`) each process writes its values to files under
PROMETHEUS_MULTIPROC_DIR and a scrape, whichever worker answers it, reports the whole server:
counters and histograms summed, the queue gauge summed over the live workers, the info gauge their
maximum. With one process the metrics live in a registry of the app's own (several apps can live in
one test process).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "capsnet_requests_total",
            "HTTP requests",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "capsnet_request_seconds",
            "HTTP request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch_size = Histogram(
            "capsnet_batch_images",
            "images per inference batch",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "capsnet_queue_seconds",
            "time a request waited for its batch",
            ["model"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
        )
        self.inference_time = Histogram(
            "capsnet_inference_seconds",
            "onnxruntime time per batch",
            ["model"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.queue_depth = Gauge(
            "capsnet_queue_images",
            "images waiting or in inference",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        # gRPC calls in their own families (the HTTP ones above keep their names and labels); the batch,
        # queue and inference metrics are shared: both protocols feed the same batchers
        self.grpc_requests = Counter(
            "capsnet_grpc_requests_total",
            "gRPC calls (Open Inference Protocol, health)",
            ["method", "code"],
            registry=self.registry,
        )
        self.grpc_latency = Histogram(
            "capsnet_grpc_request_seconds",
            "gRPC call latency",
            ["method"],
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.rejected = Counter(
            "capsnet_rejected_total",
            "requests refused because the model's queue was full",
            ["model"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "capsnet_model_info",
            "1 for the version of each model being served, 0 for one no longer served",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )

    def observer(
        self, model: str
    ) -> tuple[Callable[[int, list[float], float], None], Callable[[float], None]]:
        """The batcher's hooks for one model: (observe a batch, the queue depth changed)."""
        batch, queue, infer = (
            m.labels(model) for m in (self.batch_size, self.queue_time, self.inference_time)
        )
        depth = self.queue_depth.labels(model)

        def observe(images: int, queue_seconds: list[float], inference_seconds: float) -> None:
            batch.observe(images)
            infer.observe(inference_seconds)
            for q in queue_seconds:
                queue.observe(q)

        return observe, depth.set

    def scrape(self) -> bytes:
        """The text exposition: the whole server's when several workers share a metrics folder."""
        if os.environ.get(MULTIPROCESS_DIR):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))


def forget_dead_workers() -> None:
    """Drop the live-gauge files of worker processes that are gone (a worker that uvicorn restarted),
    so that a summed gauge does not count them."""
    folder = os.environ.get(MULTIPROCESS_DIR)
    if not folder:
        return
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        if not Path(f"/proc/{pid}").exists():
            multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
