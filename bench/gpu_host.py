"""The first run on a GPU host, in one command: what the service really runs on and how fast, written
to one JSON file and printed as a table.

    python -m bench.gpu_host --output gpu-host.json               # from a checkout (the repository root)
    docker run --rm --gpus all -v "$PWD:/src:ro" -v /tmp:/out -w /src capsnet-service:gpu \\
        python3 -m bench.gpu_host --output /out/gpu-host.json    # inside the GPU image
    python -m bench.gpu_host --device cpu --batches 1 4 --seconds 0.3 --http-seconds 1   # plumbing only

In order, each step recorded even when it fails: the GPU and its memory (nvidia-smi) before anything
runs; raw onnxruntime images/s at each batch size in fp32 and fp16, with the providers each session
really uses; `capsnet serve` with several workers (CAPSNET_REQUIRE_GPU=1 on a GPU, so a silent fall-back
to the CPU cannot happen): the providers /metadata names, /predict requests/s under closed-loop load,
the Open Inference Protocol at B = 64 per call over HTTP (binary tensors) and gRPC; the GPU's memory
with the workers up and again after everything stopped. Within a budget (five minutes by default).

Without a usable GPU it says so in one line, writes that into the JSON and exits 2; a step that fails
is recorded with its error and the run goes on (exit 1 at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench import free_port, latency_stats, served_model_name, start_server, timed_calls
from bench.load import Client, stop_server, summarize

ROOT = Path(__file__).resolve().parent.parent
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
V2_BATCH, GRPC_STREAMS = 64, 4
SERVED = ["probabilities", "poses"]  # what /predict reads back


def default_model_dir() -> Path:
    """The image's model (CAPSNET_MODEL_DIR), else the checkout's."""
    return Path(os.environ.get("CAPSNET_MODEL_DIR", ROOT / "models" / "capsnet-mnist"))


def no_gpu_reason() -> str | None:
    """Why the CUDA provider cannot run here, or None when it can be tried."""
    import onnxruntime as ort

    from capsnet.service.engine import cuda_driver_present

    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime has no CUDA provider ({ort.get_available_providers()}): install onnxruntime-gpu"
    if not cuda_driver_present():
        return "no NVIDIA driver (libcuda.so.1) is visible: no GPU here, or the container was started without --gpus"
    return None


def use_cuda_wheels() -> list[str]:
    """Make NVIDIA's CUDA and cuDNN wheels of this interpreter findable, as the GPU image does with its
    linker cache: loaded into this process (onnxruntime.preload_dlls) and named in LD_LIBRARY_PATH for
    the servers it starts. So a checkout with the wheels installed runs like the image. Their folders."""
    import onnxruntime as ort

    folders = sorted(str(p) for p in Path(ort.__file__).parent.parent.glob("nvidia/*/lib") if p.is_dir())
    if folders:
        ort.preload_dlls()
        current = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([*folders, *([current] if current else [])])
    return folders


def device_memory() -> list[dict[str, Any]] | dict[str, str]:
    """Each GPU's memory in use and in all (MiB), from nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"error": "nvidia-smi not found"}
    query = "index,name,memory.used,memory.total,driver_version"
    out = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:300]}
    rows = []
    for line in out.stdout.strip().splitlines():
        index, name, used, total, driver = (f.strip() for f in line.split(","))
        rows.append({"index": int(index), "name": name, "used_mib": float(used), "total_mib": float(total),
                     "driver": driver})  # fmt: skip
    return rows


def fp16_model(model_dir: Path, workdir: Path) -> Path:
    """capsnet-fp16.onnx beside the model, else written from capsnet.onnx (needs onnx, the [train] extra)."""
    shipped = model_dir / "capsnet-fp16.onnx"
    if shipped.is_file():
        return shipped
    try:
        import onnx

        from capsnet.model_export.fp16 import to_fp16
    except ImportError as exc:
        raise RuntimeError(
            f"no capsnet-fp16.onnx in {model_dir} and no onnx to write one ({exc}): run "
            f"`capsnet fp16 {model_dir}` where the [train] extra is installed, then mount the folder"
        ) from exc
    path = workdir / "capsnet-fp16.onnx"
    onnx.save(to_fp16(onnx.load(str(model_dir / "capsnet.onnx"))), str(path))
    return path


def raw(path: Path, device: str, batches: list[int], seconds: float) -> dict[str, Any]:
    """onnxruntime as the service runs it (its session options; numpy in, the served outputs out):
    images/s at each batch size over at least `seconds` of runs."""
    import onnxruntime as ort

    from capsnet.service.engine import session_options

    providers: list[Any] = [CPU]
    if device == "cuda":
        providers = [(CUDA, {"cudnn_conv_algo_search": "EXHAUSTIVE"}), CPU]
    session = ort.InferenceSession(str(path), session_options(0), providers=providers)
    used = session.get_providers()
    if device == "cuda" and used[0] != CUDA:
        raise RuntimeError(f"onnxruntime fell back to {used} for {path.name}")
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        run = lambda: session.run(SERVED, {"image": x})  # noqa: E731
        probe = timed_calls(run, 3, warmup=3)  # also the warm-up (cuDNN's algorithm search)
        iters = max(5, int(seconds / max(min(probe), 1e-6)))
        rows.append(latency_stats(timed_calls(run, iters, warmup=0), batch) | {"runs": iters})
    return {"file": path.name, "providers": used, "batches": rows}


class BinaryV2(Client):
    """The v2 infer route with Triton's binary tensor extension: the JSON header, then the raw input."""

    def __init__(self, host: str, port: int, model: str, x: np.ndarray) -> None:
        header = json.dumps({
            "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in SERVED],
        }).encode()  # fmt: skip
        super().__init__(
            host, port, f"/v2/models/{model}/infer", header + x.tobytes(), "application/octet-stream"
        )
        self.header_length = len(header)

    def request_bytes(self) -> bytes:
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n"
            f"Inference-Header-Content-Length: {self.header_length}\r\n\r\n"
        )
        return head.encode() + self.body

    def probabilities(self) -> np.ndarray:
        """One request through urllib: the probabilities it answers, for a check against raw ORT."""
        request = urllib.request.Request(
            f"http://{self.host}:{self.port}{self.path}", data=self.body, method="POST",
            headers={"Content-Type": self.content_type, "Inference-Header-Content-Length": str(self.header_length)},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as r:  # noqa: S310  (http, this machine)
            n = int(r.headers["Inference-Header-Content-Length"])
            body = r.read()
        answer = json.loads(body[:n])
        offset = n
        for out in answer["outputs"]:
            size = out["parameters"]["binary_data_size"]
            if out["name"] == "probabilities":
                return np.frombuffer(body[offset : offset + size], np.float32).reshape(out["shape"])
            offset += size
        raise RuntimeError("no probabilities in the v2 answer")


def closed_loop(client: Client, concurrency: int, seconds: float) -> dict[str, Any]:
    asyncio.run(client.closed_loop(concurrency, min(1.0, seconds)))  # warm-up
    client.results.clear()
    asyncio.run(client.closed_loop(concurrency, seconds))
    s = summarize(client.results)
    ok = s["status"].get("200", {})
    return {"concurrency": concurrency, "requests_per_s": ok.get("count", 0) / seconds, "p50_ms": ok.get("p50_ms"),
            "p99_ms": ok.get("p99_ms"), "non_200": s["requests"] - ok.get("count", 0)}  # fmt: skip


def grpc_v2(port: int, model: str, x: np.ndarray, seconds: float) -> dict[str, Any]:
    """B images per ModelInfer from a few concurrent tritonclient.grpc streams."""
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(f"127.0.0.1:{port}") for _ in range(GRPC_STREAMS)]
    image = grpcclient.InferInput("image", list(x.shape), "FP32")
    image.set_data_from_numpy(x)
    outputs = [grpcclient.InferRequestedOutput(n) for n in SERVED]

    def stream(c: Any, end: float) -> list[float]:
        out = []
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            c.infer(model, [image], outputs=outputs)
            out.append(time.perf_counter() - t0)
        return out

    try:
        first = clients[0].infer(model, [image], outputs=outputs).as_numpy("probabilities")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(GRPC_STREAMS) as pool:
            per_stream = list(pool.map(stream, clients, [t0 + seconds] * GRPC_STREAMS))
        wall = time.perf_counter() - t0
    finally:
        for c in clients:
            c.close()
    latencies = sorted(t for s in per_stream for t in s)
    return {"batch": len(x), "streams": GRPC_STREAMS, "calls": len(latencies),
            "images_per_s": len(latencies) * len(x) / wall, "p50_ms": 1e3 * latencies[len(latencies) // 2],
            "probabilities": first}  # fmt: skip


def all_workers_ready(proc: subprocess.Popen[bytes], workers: int, timeout: float = 180.0) -> None:
    """start_server returns when one worker answers ready; another may still be warming up, busy, not
    accepting connections, and answer 503 later. Each worker logs its warm-up (capsnet.service.state): wait
    for one such line per worker."""
    log = proc.log.fileno()  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    # pread: the server writes through the same open file, whose offset must not move
    while os.pread(log, 1 << 24, 0).count(b"warm-up done") < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"not every one of {workers} workers warmed up within {timeout:.0f} s")
        time.sleep(0.2)


def service(args: argparse.Namespace, result: dict[str, Any], reference: np.ndarray, x: np.ndarray) -> None:
    """`capsnet serve` with several workers: providers, /predict, v2 over HTTP and gRPC, memory."""
    port, grpc_port = free_port(), free_port()
    # log level info, the default that deployments run with: its access lines are part of the cost, and
    # its warm-up lines tell when every worker is ready
    env = {"CAPSNET_MODEL_DIR": str(args.model_dir), "CAPSNET_GRPC_PORT": str(grpc_port),
           "CAPSNET_REQUIRE_GPU": "1" if args.device == "cuda" else "0", "CAPSNET_LOG_LEVEL": "info"}  # fmt: skip
    if args.device == "cpu":
        env["CAPSNET_PROVIDERS"] = CPU
    cmd = [sys.executable, "-m", "capsnet", "serve", "--port", str(port), "--workers", str(args.workers)]
    proc = start_server(cmd, port, env)
    out: dict[str, Any] = {"workers": args.workers}
    result["service"] = out
    try:
        all_workers_ready(proc, args.workers)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata", timeout=10) as r:
            out["providers"] = json.load(r)["providers"]
        if args.device == "cuda" and out["providers"][0] != CUDA:
            raise RuntimeError(f"the service runs on {out['providers']}")
        result["memory"]["service_up"] = device_memory() if args.device == "cuda" else None
        model = served_model_name(port)
        predict = Client("127.0.0.1", port, "/predict", args.body.read_bytes())
        out["predict"] = closed_loop(predict, args.concurrency, args.http_seconds)
        v2 = BinaryV2("127.0.0.1", port, model, x)
        got = v2.probabilities()
        out["v2_http"] = closed_loop(v2, GRPC_STREAMS, args.http_seconds) | {
            "batch": len(x), "max_abs_diff_vs_raw": float(np.abs(got - reference).max())
        }  # fmt: skip
        out["v2_http"]["images_per_s"] = out["v2_http"]["requests_per_s"] * len(x)
        grpc = grpc_v2(grpc_port, model, x, args.http_seconds)
        grpc["max_abs_diff_vs_raw"] = float(np.abs(grpc.pop("probabilities") - reference).max())
        out["v2_grpc"] = grpc
    finally:
        out["tracebacks_in_log"] = stop_server(proc)


def step(result: dict[str, Any], name: str, fn: Any, *args: Any) -> Any:
    """Run one step; a failure is recorded under `errors` (and printed), not raised."""
    try:
        return fn(*args)
    except Exception as exc:  # every step's failure is a result of the run too
        message = f"{type(exc).__name__}: {str(exc).strip()[-600:]}"
        result["errors"][name] = message
        print(f"gpu_host: {name} failed: {message}", file=sys.stderr, flush=True)
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    start = time.monotonic()
    result: dict[str, Any] = {
        "machine": {
            "device": args.device,
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "cores": os.cpu_count(),
            "available_providers": ort.get_available_providers(),
        },
        "memory": {},
        "raw": {},
        "errors": {},
    }
    if args.device == "cuda":
        reason = no_gpu_reason()
        if reason is not None:
            result["errors"]["gpu"] = reason
            return result
    gpu = args.device == "cuda"
    result["machine"]["cuda_library_folders"] = use_cuda_wheels() if gpu else []
    result["memory"]["before"] = device_memory() if gpu else None
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = args.model_dir / "capsnet.onnx"
        result["raw"]["fp32"] = step(result, "raw fp32", raw, fp32, args.device, args.batches, args.seconds)
        half = step(result, "fp16 model", fp16_model, args.model_dir, Path(tmp))
        if half is not None:
            result["raw"]["fp16"] = step(
                result, "raw fp16", raw, half, args.device, args.batches, args.seconds
            )
    result["memory"]["after_raw"] = device_memory() if gpu else None
    if time.monotonic() - start > args.budget * 0.6:
        result["errors"]["service"] = "skipped: the raw cases took most of the budget"
    else:
        x = np.random.default_rng(1).random((V2_BATCH, 1, 28, 28), dtype=np.float32)
        reference = step(result, "reference", _reference, fp32, x)
        if reference is not None:
            step(result, "service", service, args, result, reference, x)
    result["memory"]["after"] = device_memory() if gpu else None
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def _reference(path: Path, x: np.ndarray) -> np.ndarray:
    """Raw onnxruntime's probabilities on the CPU, what the service's v2 answers are checked against."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=[CPU])
    return np.asarray(session.run(["probabilities"], {"image": x})[0])


def print_table(r: dict[str, Any]) -> None:
    print(f"\n{r['machine']}")
    for when, mem in r["memory"].items():
        if isinstance(mem, list):
            print(
                f"device memory {when:10s} "
                + ", ".join(f"GPU{m['index']} {m['used_mib']:.0f}/{m['total_mib']:.0f} MiB" for m in mem)
            )
    for precision, case in r["raw"].items():
        if case:
            cells = " | ".join(f"B={b['batch']}: {b['images_per_s']:.0f} img/s" for b in case["batches"])
            print(f"raw {precision} on {case['providers'][0]}: {cells}")
    s = r.get("service") or {}
    if "predict" in s:
        print(
            f"service ({s['workers']} workers, {s['providers'][0]}): /predict {s['predict']['requests_per_s']:.0f} req/s"
        )
    for key in ("v2_http", "v2_grpc"):
        if key in s:
            print(f"{key} B={s[key]['batch']}: {s[key]['images_per_s']:.0f} img/s")
    for name, error in r["errors"].items():
        print(f"FAILED {name}: {error}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the same steps, no GPU")
    p.add_argument("--model-dir", type=Path, default=default_model_dir())
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--seconds", type=float, default=3.0, help="raw runs per batch size and precision")
    p.add_argument("--workers", type=int, default=4, help="`capsnet serve --workers`")
    p.add_argument("--concurrency", type=int, default=64, help="connections for /predict")
    p.add_argument("--http-seconds", type=float, default=10.0, help="load per HTTP or gRPC case")
    p.add_argument("--body", type=Path, default=ROOT / "examples" / "7.png", help="the /predict body")
    p.add_argument("--budget", type=float, default=300.0, help="seconds the whole run may take")
    p.add_argument("--output", type=Path, default=Path("gpu-host.json"))
    args = p.parse_args(argv)
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    if "gpu" in result["errors"]:
        print(f"gpu_host: no usable GPU: {result['errors']['gpu']} (wrote {args.output})", file=sys.stderr)
        return 2
    print_table(result)
    print(f"wrote {args.output} in {result['seconds']} s")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
