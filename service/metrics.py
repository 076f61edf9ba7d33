"""Prometheus metrics in a registry of the app's own (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "capsnet_queue_seconds",
            "time a request waited for its batch",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
        )
        self.inference_time = Histogram(
            "capsnet_inference_seconds",
            "onnxruntime time per batch",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.queue_depth = Gauge(
            "capsnet_queue_images", "images waiting or in inference", registry=self.registry
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
            "capsnet_rejected_total", "requests refused because the queue was full", registry=self.registry
        )

    def observe_batch(self, images: int, queue_seconds: list[float], inference_seconds: float) -> None:
        self.batch_size.observe(images)
        self.inference_time.observe(inference_seconds)
        for q in queue_seconds:
            self.queue_time.observe(q)
