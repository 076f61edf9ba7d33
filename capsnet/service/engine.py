"""onnxruntime sessions, provider choice, model metadata and warm-up. numpy in, numpy out."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort

from capsnet.service.cpu import host
from capsnet.service.preprocess import MODES, Mode
from capsnet.service.settings import Settings

log = logging.getLogger(__name__)

CLASSIFIER_OUTPUTS = ("probabilities", "poses", "coupling", "primary_activations")
# The classifier file per precision, same inputs and outputs: capsnet-fp16.onnx is what
# capsnet/model_export/fp16.py writes (Conv and MatMul in half precision, for GPUs), capsnet-int8.onnx what
# capsnet/model_export/quantize.py writes (the convolutions in int8, for CPUs).
CLASSIFIER_FILES = {"fp32": "capsnet.onnx", "fp16": "capsnet-fp16.onnx", "int8": "capsnet-int8.onnx"}
WRITTEN_BY = {"fp16": "capsnet fp16", "int8": "capsnet quantize"}
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class EngineError(RuntimeError):
    """The model cannot be served (missing or foreign file, GPU demanded but unusable)."""


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
    # the preprocessing of a request that names none (capsnet.service.preprocess.MODES); the metadata key
    # `preprocess` that `capsnet export` writes, "mnist" for models exported before it existed
    preprocess: Mode = "mnist"


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


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's cpuset, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def session_options(intra_op_threads: int, spinning: bool = False) -> ort.SessionOptions:
    """The service's session options. Spinning off: between two batches onnxruntime's intra-op threads
    would spin-wait for work, burning the cores the event loop needs to read the next requests."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # provider fall-back is reported by us, not as ORT console noise
    return so


def _with_options(
    providers: list[str], cuda_options: dict[str, str]
) -> list[str | tuple[str, dict[str, str]]]:
    """The CUDA provider with its options (cuDNN's convolution algorithm search above all: Conv1 and
    PrimaryCaps are most of the work), the others as they are."""
    return [(p, cuda_options) if p == CUDA else p for p in providers]


def _open(
    path: Path,
    providers: list[str],
    threads: int,
    cuda_options: dict[str, str] | None = None,
    spinning: bool = False,
) -> ort.InferenceSession:
    if not path.is_file():
        raise EngineError(f"model file not found: {path}")
    try:
        return ort.InferenceSession(
            str(path),
            session_options(threads, spinning),
            providers=_with_options(providers, cuda_options or {}),
        )
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise EngineError(f"cannot load {path.name}: {str(exc).splitlines()[0][:300]}") from exc


def _check_int8_here(session: ort.InferenceSession, path: Path) -> None:
    """Refuse an int8 file whose answers would be wrong on this CPU; say so where int8 gains little.

    Without VNNI, onnxruntime's int8 kernels sum pairs of products in 16 bits with saturation
    (capsnet/service/cpu.py): only a file whose weights fit 7 bits (`capsnet quantize` records `weight_bits`)
    computes there what it computes on a VNNI CPU."""
    cpu = host()
    if cpu["vnni"] or not cpu["present"]:
        return  # exact int8 sums, or a CPU whose features cannot be read: nothing to say
    quantization = session.get_modelmeta().custom_metadata_map.get("quantization", "{}")
    try:
        bits = json.loads(quantization).get("weight_bits", 8)
    except (ValueError, AttributeError):
        bits = 8
    if cpu["int8_saturates"] and bits > 7:
        raise EngineError(
            f"CAPSNET_PRECISION=int8: {path.name} has {bits}-bit weights, whose int8 sums saturate on this "
            f"CPU ({cpu['int8_kernels']}) and change its answers; write it again with `capsnet quantize "
            f"{path.parent}` (7-bit weights) or serve CAPSNET_PRECISION=fp32"
        )
    log.warning(
        "CAPSNET_PRECISION=int8 on a CPU without VNNI (%s): answers as on any CPU, but int8 gains "
        "less over fp32 here than on VNNI or AMX CPUs; compare both with `python -m bench`",
        cpu["int8_kernels"],
    )


def _missing_file(model_dir: Path, precision: str, path: Path) -> str:
    """Why CAPSNET_PRECISION cannot be served from `model_dir`, and what to do: write the file, or,
    where the model card records that `capsnet quantize` refused one, serve fp32."""
    card_path = model_dir / "model_card.json"
    try:
        int8 = json.loads(card_path.read_text()).get("int8") if card_path.exists() else None
    except (OSError, ValueError, AttributeError):
        int8 = None
    if precision == "int8" and isinstance(int8, dict) and int8.get("written") is False:
        return (
            f"CAPSNET_PRECISION=int8 needs {path}, which this model does not have: `capsnet quantize` "
            f"refused to write it ({int8.get('refused', 'see its model card')}); serve it with "
            "CAPSNET_PRECISION=fp32"
        )
    return (
        f"CAPSNET_PRECISION={precision} needs {path}: write it with `{WRITTEN_BY[precision]} {model_dir}` "
        "(needs the [train] extra)"
    )


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
        gpu_mem_limit_mb: int = 0,
        gpu_arena_extend: str = "kSameAsRequested",
        intra_op_spinning: bool = False,
        parallel_batches: int = 1,
        beside: bool = False,
    ) -> None:
        """`beside`: a model served beside the default one. Where it lacks the file `precision` names
        it is served in fp32, with a warning, and /metadata says so: one model without an int8 file
        (its accuracy gate refused one) should not stop a server whose operator asked for int8 for
        the model they pointed at. The default model (and `capsnet predict`'s) must have the file."""
        wanted = choose_providers(providers)
        cuda_options = {
            "cudnn_conv_algo_search": cudnn_conv_algo_search,
            "do_copy_in_default_stream": "1",
            "arena_extend_strategy": gpu_arena_extend,  # kSameAsRequested: the arena grows by what is asked
        }
        if gpu_mem_limit_mb:
            cuda_options["gpu_mem_limit"] = str(gpu_mem_limit_mb * 2**20)
        self.model_dir = model_dir
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
            if not beside:
                raise EngineError(_missing_file(model_dir, precision, classifier_path))
            log.warning(
                "CAPSNET_PRECISION=%s: %s has no %s, so it is served in fp32 (%s); `%s %s` writes one "
                "where its accuracy allows (needs the [train] extra)",
                precision,
                model_dir,
                classifier_path.name,
                CLASSIFIER_FILES["fp32"],
                WRITTEN_BY[precision],
                model_dir,
            )
            precision, classifier_path = "fp32", model_dir / CLASSIFIER_FILES["fp32"]
        self.precision = precision
        self.classifier_file = classifier_path.name  # what /metadata reports as in use
        self.classifier = _open(classifier_path, wanted, intra_op_threads, cuda_options, intra_op_spinning)
        self.providers: list[str] = self.classifier.get_providers()  # what ORT really uses
        if precision == "int8" and CUDA not in self.providers:
            _check_int8_here(self.classifier, classifier_path)
        self.cuda_options = cuda_options if CUDA in self.providers else {}  # what it was given, for /metadata
        if CUDA in wanted and CUDA not in self.providers:
            log.warning(
                "CUDA was requested but onnxruntime fell back to %s (no usable GPU, CUDA 13 "
                "or cuDNN 9 libraries)",
                self.providers,
            )
        # On the CPU a second session of the same file runs on one core (its calling thread), so that
        # while one batch runs, the next can run beside it instead of waiting: onnxruntime's own
        # threads divide small batches across cores less well than two batches side by side do.
        self.parallel_batches = 1 if CUDA in self.providers else (parallel_batches or available_cores())
        self.narrow = (
            _open(classifier_path, [CPU], 1, None, intra_op_spinning) if self.parallel_batches > 1 else None
        )
        if require_gpu and CUDA not in self.providers:
            raise EngineError(
                "CAPSNET_REQUIRE_GPU=1 but the CUDA provider is not usable here; onnxruntime fell back "
                f"to {self.providers} (check the GPU, the NVIDIA driver, CUDA 13 and cuDNN 9)"
            )
        decoder_path = model_dir / "decoder.onnx"
        self.decoder = (
            _open(decoder_path, wanted, intra_op_threads, cuda_options, intra_op_spinning)
            if decoder_path.exists()
            else None
        )
        self.info = self._read_info(model_dir)
        log.info(
            "loaded %s %s from %s (%s) on %s",
            self.info.name,
            self.info.version,
            model_dir,
            self.classifier_file,
            self.providers,
        )

    @classmethod
    def from_settings(cls, s: Settings, model_dir: Path | None = None, *, beside: bool = False) -> Engine:
        """The engine for `model_dir` (default: the settings' model) with the settings' options;
        `beside`: as in `Engine`."""
        return cls(
            model_dir or s.model_dir,
            providers=s.providers,
            intra_op_threads=s.intra_op_threads,
            require_gpu=s.require_gpu,
            cudnn_conv_algo_search=s.cudnn_conv_algo_search,
            precision=s.precision,
            gpu_mem_limit_mb=s.gpu_mem_limit_mb,
            gpu_arena_extend=s.gpu_arena_extend,
            intra_op_spinning=s.intra_op_spinning,
            parallel_batches=s.parallel_batches,
            beside=beside,
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
        preprocess = meta.get("preprocess", "mnist")
        if preprocess not in MODES:
            raise EngineError(f"capsnet.onnx names an unknown preprocessing {preprocess!r}; known: {MODES}")
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
            preprocess=cast(Mode, preprocess),
        )

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.info.outputs]

    def classify(
        self, images: np.ndarray, outputs: list[str] | None = None, narrow: bool = False
    ) -> dict[str, np.ndarray]:
        """images float32 (B, 1, 28, 28) in [0, 1] -> the requested outputs by name. `narrow`: on one
        core (the one-thread session, where there is one), while another batch runs on the others."""
        names = outputs or self.output_names
        session = self.narrow if narrow and self.narrow is not None else self.classifier
        return dict(zip(names, session.run(names, {"image": images}), strict=True))

    def reconstruct(self, poses: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.decoder is None:
            raise EngineError("this model directory has no decoder.onnx")
        return self.decoder.run(["reconstruction"], {"poses": poses, "mask": mask})[0]  # type: ignore[no-any-return]

    def warm_up(self, max_batch: int) -> float:
        """Run the batch sizes the batcher will use once, so the first request pays no set-up cost."""
        t0 = time.perf_counter()
        for B in sorted({1, max_batch}):
            self.classify(np.zeros((B, *self.info.image_shape), np.float32))
            if self.narrow is not None:
                self.classify(np.zeros((B, *self.info.image_shape), np.float32), narrow=True)
        return time.perf_counter() - t0
