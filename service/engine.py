"""onnxruntime sessions, provider choice, warm-up and the dynamic batcher. numpy in, numpy out."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.settings import Settings

log = logging.getLogger(__name__)

CLASSIFIER_OUTPUTS = ("probabilities", "poses", "coupling", "primary_activations")
# The classifier file per precision; capsnet-fp16.onnx is what model_export/fp16.py writes (Conv and
# MatMul in half precision, same inputs and outputs).
CLASSIFIER_FILES = {"fp32": "capsnet.onnx", "fp16": "capsnet-fp16.onnx"}
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class EngineError(RuntimeError):
    """The model cannot be served (missing or foreign file, GPU demanded but unusable)."""


class QueueFullError(RuntimeError):
    """The batcher's queue holds as many images as it may; the caller should retry later."""


class EngineClosedError(RuntimeError):
    """The service is shutting down and takes no new work."""


@dataclass(frozen=True)
class ModelInfo:
    """What the service knows about the model: all of it read from the ONNX file, nothing typed twice."""

    name: str
    version: str
    labels: list[str]
    routing_iterations: int
    num_primary: int
    primary_types: int
    primary_grid: list[int]
    image_shape: list[int]  # (C, H, W)
    metadata: dict[str, str]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    card: dict[str, Any] = field(default_factory=dict)


def _io(args: list[Any]) -> list[dict[str, Any]]:
    return [{"name": a.name, "type": a.type, "shape": a.shape} for a in args]


def cuda_driver_present() -> bool:
    """Whether an NVIDIA driver can be loaded at all (without it the CUDA provider cannot work)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def choose_providers(setting: str) -> list[str]:
    """'auto': CUDA then CPU where the CUDA provider is built in and a driver is present, else CPU.
    An explicit list is tried as given; what ORT really uses is read back after the session opens."""
    available = ort.get_available_providers()
    if setting.strip().lower() == "auto":
        if CUDA in available and not cuda_driver_present():
            log.info("no NVIDIA driver found: serving on the CPU")
        return [CUDA, CPU] if CUDA in available and cuda_driver_present() else [CPU]
    wanted = [p.strip() for p in setting.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in available]
    if unknown:
        raise EngineError(f"providers {unknown} are not built into this onnxruntime; available: {available}")
    return wanted


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # provider fall-back is reported by us, not as ORT console noise
    return so


def _with_options(
    providers: list[str], cuda_options: dict[str, str]
) -> list[str | tuple[str, dict[str, str]]]:
    """The CUDA provider with its options (cuDNN's convolution algorithm search above all: Conv1 and
    PrimaryCaps are most of the work), the others as they are."""
    return [(p, cuda_options) if p == CUDA else p for p in providers]


def _open(
    path: Path, providers: list[str], threads: int, cuda_options: dict[str, str] | None = None
) -> ort.InferenceSession:
    if not path.is_file():
        raise EngineError(f"model file not found: {path}")
    try:
        return ort.InferenceSession(
            str(path), _session_options(threads), providers=_with_options(providers, cuda_options or {})
        )
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise EngineError(f"cannot load {path.name}: {str(exc).splitlines()[0][:300]}") from exc


class Engine:
    """The classifier and decoder sessions, shared by all requests. `run` is thread-safe (ORT is)."""

    def __init__(
        self,
        model_dir: Path,
        providers: str = "auto",
        intra_op_threads: int = 0,
        require_gpu: bool = False,
        cudnn_conv_algo_search: str = "EXHAUSTIVE",
        precision: str = "fp32",
    ) -> None:
        wanted = choose_providers(providers)
        cuda_options = {"cudnn_conv_algo_search": cudnn_conv_algo_search, "do_copy_in_default_stream": "1"}
        if require_gpu and CUDA not in wanted:
            if CUDA not in ort.get_available_providers():
                why = (
                    f"this onnxruntime has no CUDAExecutionProvider (it has {ort.get_available_providers()})"
                )
            elif not cuda_driver_present():
                why = "no NVIDIA driver (libcuda.so.1) is visible: no GPU, or the container lacks --gpus"
            else:
                why = f"the providers setting {providers!r} leaves CUDA out"
            raise EngineError(f"CAPSNET_REQUIRE_GPU=1 but CUDA is not usable: {why}")
        classifier_path = model_dir / CLASSIFIER_FILES[precision]
        if precision != "fp32" and not classifier_path.exists():
            raise EngineError(
                f"CAPSNET_PRECISION={precision} needs {classifier_path}: write it with "
                f"`capsnet fp16 {model_dir}` (needs the [train] extra)"
            )
        self.classifier = _open(classifier_path, wanted, intra_op_threads, cuda_options)
        self.providers: list[str] = self.classifier.get_providers()  # what ORT really uses
        if CUDA in wanted and CUDA not in self.providers:
            log.warning(
                "CUDA was requested but onnxruntime fell back to %s (no usable GPU, CUDA 13 "
                "or cuDNN 9 libraries)",
                self.providers,
            )
        if require_gpu and CUDA not in self.providers:
            raise EngineError(
                "CAPSNET_REQUIRE_GPU=1 but the CUDA provider is not usable here; onnxruntime fell back "
                f"to {self.providers} (check the GPU, the NVIDIA driver, CUDA 13 and cuDNN 9)"
            )
        decoder_path = model_dir / "decoder.onnx"
        self.decoder = (
            _open(decoder_path, wanted, intra_op_threads, cuda_options) if decoder_path.exists() else None
        )
        self.info = self._read_info(model_dir)
        log.info("loaded %s %s from %s on %s", self.info.name, self.info.version, model_dir, self.providers)

    @classmethod
    def from_settings(cls, s: Settings, model_dir: Path | None = None) -> Engine:
        """The engine for `model_dir` (default: the settings' model) with the settings' options."""
        return cls(
            model_dir or s.model_dir,
            providers=s.providers,
            intra_op_threads=s.intra_op_threads,
            require_gpu=s.require_gpu,
            cudnn_conv_algo_search=s.cudnn_conv_algo_search,
            precision=s.precision,
        )

    def _read_info(self, model_dir: Path) -> ModelInfo:
        sess = self.classifier
        names = [o.name for o in sess.get_outputs()]
        if [i.name for i in sess.get_inputs()] != ["image"] or names[:3] != list(CLASSIFIER_OUTPUTS[:3]):
            raise EngineError(
                f"capsnet.onnx is not a CapsNet export: inputs {[i.name for i in sess.get_inputs()]}, "
                f"outputs {names}"
            )
        meta = dict(sess.get_modelmeta().custom_metadata_map)
        try:
            labels = json.loads(meta["labels"])
            primary = json.loads(meta["primary_capsules"])
            r = int(meta["routing_iterations"])
        except (KeyError, ValueError) as exc:
            raise EngineError(f"capsnet.onnx lacks the CapsNet metadata ({exc})") from exc
        card_path = model_dir / "model_card.json"
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        return ModelInfo(
            name=meta.get("name", model_dir.name),
            version=meta.get("version", "unknown"),
            labels=labels,
            routing_iterations=r,
            num_primary=int(primary["count"]),
            primary_types=int(primary["types"]),
            primary_grid=list(primary["grid"]),
            image_shape=list(sess.get_inputs()[0].shape[1:]),
            metadata=meta,
            inputs=_io(sess.get_inputs()),
            outputs=_io(sess.get_outputs()),
            card=card,
        )

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.info.outputs]

    def classify(self, images: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """images float32 (B, 1, 28, 28) in [0, 1] -> the requested outputs by name."""
        names = outputs or self.output_names
        return dict(zip(names, self.classifier.run(names, {"image": images}), strict=True))

    def reconstruct(self, poses: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.decoder is None:
            raise EngineError("this model directory has no decoder.onnx")
        return self.decoder.run(["reconstruction"], {"poses": poses, "mask": mask})[0]  # type: ignore[no-any-return]

    def warm_up(self, max_batch: int) -> float:
        """Run the batch sizes the batcher will use once, so the first request pays no set-up cost."""
        t0 = time.perf_counter()
        for B in sorted({1, max_batch}):
            self.classify(np.zeros((B, *self.info.image_shape), np.float32))
        return time.perf_counter() - t0


@dataclass
class _Item:
    images: np.ndarray
    coupling: bool
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float


@dataclass
class BatchStats:
    """Hooks for metrics: called with (batch images, queue seconds of each item, inference seconds)."""

    observe: Callable[[int, list[float], float], None] | None = None


class Batcher:
    """Gathers concurrent requests into one inference (up to max_batch images, waiting at most
    max_wait_ms for more), over a queue bounded in images. Inference runs in one worker thread, so
    the event loop never blocks and ORT gets the cores for one batch at a time."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        stats: BatchStats | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.stats = stats or BatchStats()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._pending = 0  # images queued or being inferred
        self._arriving = 0  # requests still being read or decoded: worth waiting for
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capsnet-infer")
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="capsnet-batcher")

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap the reading of a request: a batch waits up to max_wait only while some are arriving,
        so a lone request at concurrency 1 is never held back for company that is not coming."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def submit(self, images: np.ndarray, coupling: bool = False) -> dict[str, np.ndarray]:
        """Queue images (k, 1, 28, 28); returns their outputs once their batch has run."""
        if self._closed:
            raise EngineClosedError("the service is shutting down")
        n = len(images)
        if self._pending + n > self.queue_size:
            raise QueueFullError(f"{self._pending} images are waiting (limit {self.queue_size})")
        loop = asyncio.get_running_loop()
        item = _Item(images, coupling, loop.create_future(), loop.time())
        self._pending += n
        self._queue.put_nowait(item)
        return await item.future

    async def _collect(self) -> list[_Item]:
        batch = [await self._queue.get()]
        n = len(batch[0].images)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while n < self.max_batch:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0 or not self._arriving:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if n + len(item.images) > self.max_batch:
                self._defer(item)
                break
            batch.append(item)
            n += len(item.images)
        return batch

    def _defer(self, item: _Item) -> None:
        """Put an item that does not fit back at the head of the queue."""
        rest = [item]
        while not self._queue.empty():
            rest.append(self._queue.get_nowait())
        for it in rest:
            self._queue.put_nowait(it)

    def _infer(self, images: np.ndarray, coupling: bool) -> tuple[dict[str, np.ndarray], float]:
        t0 = time.perf_counter()
        names = [n for n in self.engine.output_names if coupling or n != "coupling"]
        return self.engine.classify(images, names), time.perf_counter() - t0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [it for it in batch if not it.future.done()]  # callers may have timed out
            try:
                if live:
                    images = np.concatenate([it.images for it in live])
                    started = loop.time()
                    coupling = any(it.coupling for it in live)
                    out, seconds = await loop.run_in_executor(self._executor, self._infer, images, coupling)
                    if self.stats.observe:
                        self.stats.observe(len(images), [started - it.enqueued for it in live], seconds)
                    start = 0
                    for it in live:
                        k = len(it.images)
                        if not it.future.done():
                            it.future.set_result({name: a[start : start + k] for name, a in out.items()})
                        start += k
            except Exception as exc:  # an inference error fails this batch, never the batcher
                log.exception("inference failed for a batch of %d requests", len(live))
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(exc)
            finally:
                self._pending -= sum(len(it.images) for it in batch)

    async def close(self, grace_s: float = 10.0) -> None:
        """Refuse new work, let queued and running batches finish (up to grace_s), then stop."""
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._pending and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)
