"""One run, side by side: PyTorch eager vs onnxruntime raw, the conv-only ceiling, the service over HTTP
(batcher on and off), the service over gRPC (B = 64 per call) and a plain FastAPI + PyTorch baseline.
Prints a table, writes JSON.

HTTP load comes from wrk (a C program with a Lua script for the POST body), not from Python on the same
cores. Every figure in one JSON comes from one run on one machine, so ratios are like for like.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capsnet.service.cpu import vector_extensions

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    ext = vector_extensions()
    return {
        "cpu": ext["model"],
        "vector_extensions": ext,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "gpu": None,
    }


def timed_calls(fn: Any, iters: int, warmup: int = 2, sync: Any = None) -> list[float]:
    """Wall time of each of `iters` calls after `warmup` ones; `sync` (e.g. torch.cuda.synchronize)
    waits for work a call leaves running on a device."""
    wait = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    wait()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        wait()
        out.append(time.perf_counter() - t0)
    return out


def calls_per_case(batch: int, iters: int) -> int:
    """Timed calls of one raw case: `iters` at B <= 15, fewer for bigger batches (at least 3)."""
    return max(3, iters // max(1, batch // 8))


def latency_stats(samples: list[float], batch: int, core_s: float | None = None) -> dict[str, float]:
    """Latency percentiles and throughput; with `core_s` (the process's CPU time over the samples),
    the core time each image cost."""
    a = np.array(samples)
    out = {
        "batch": batch,
        "p50_ms": float(np.percentile(a, 50) * 1e3),
        "p99_ms": float(np.percentile(a, 99) * 1e3),
        "images_per_s": float(batch / np.median(a)),
    }
    if core_s is not None:
        out["core_ms_per_image"] = core_s * 1e3 / (batch * len(samples))
    return out


def _timed_with_cpu(fn: Any, iters: int) -> tuple[list[float], float]:
    """`timed_calls` plus the process's CPU time (all threads) over the timed calls."""
    fn()
    fn()
    cpu0 = time.process_time()
    samples = timed_calls(fn, iters, warmup=0)
    return samples, time.process_time() - cpu0


def _side_by_side(fn: Any, threads: int, iters: int) -> tuple[list[float], float, float]:
    """`threads` threads each making `iters` calls of `fn` at the same time (after one warm-up call
    each): every call's wall time, the wall time of the whole and the process's CPU time over it."""
    start = threading.Barrier(threads + 1)
    samples: list[list[float]] = [[] for _ in range(threads)]

    def worker(k: int) -> None:
        fn()
        start.wait()
        samples[k] = timed_calls(fn, iters, warmup=0)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for t in pool:
        t.join()
    return [x for s in samples for x in s], time.perf_counter() - t0, time.process_time() - cpu0


INT8_FILE = "capsnet-int8.onnx"  # what `capsnet quantize` writes (capsnet.model_export.quantize.INT8_FILE)


def raw_int8_cases(model_dir: Path, batches: list[int], iters: int) -> dict[str, list[dict[str, float]]]:
    """onnxruntime on capsnet-int8.onnx, each call alternating with one on capsnet.onnx, so that the
    int8 / fp32 ratio of each batch comes from the same seconds of this (shared) machine."""
    import onnxruntime as ort

    from capsnet.service.engine import session_options

    open_ = lambda f: ort.InferenceSession(  # noqa: E731
        str(model_dir / f), session_options(0), providers=["CPUExecutionProvider"]
    )
    fp32, int8 = open_("capsnet.onnx"), open_(INT8_FILE)
    rng = np.random.default_rng(0)
    rows = []
    for B in batches:
        x = rng.random((B, 1, 28, 28), dtype=np.float32)
        n = calls_per_case(B, iters)
        for s in (fp32, int8, fp32, int8):  # warm-up
            s.run(None, {"image": x})
        t32: list[float] = []
        t8: list[float] = []
        cpu8 = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            fp32.run(None, {"image": x})
            t32.append(time.perf_counter() - t0)
            c0, t0 = time.process_time(), time.perf_counter()
            int8.run(None, {"image": x})
            t8.append(time.perf_counter() - t0)
            cpu8 += time.process_time() - c0
        row = latency_stats(t8, B, cpu8)
        row["vs_fp32_alternating"] = float(np.median(t32) / np.median(t8))
        rows.append(row)
    return {"onnxruntime_int8": rows}


def export_conv_only(path: Path) -> None:
    """Conv1 + ReLU + PrimaryCaps convolution alone: the part no routing code can avoid."""
    import torch

    from capsnet.model_export.export import to_onnx
    from capsnet.model_export.model import CapsNet

    class Convolutions(torch.nn.Module):
        def __init__(self, m: CapsNet) -> None:
            super().__init__()
            self.conv1, self.conv2 = m.conv1, m.primary.conv

        def forward(self, image: torch.Tensor) -> torch.Tensor:  # torch.export names inputs after these
            return self.conv2(torch.relu(self.conv1(image)))

    # exported like the classifier it is compared with
    to_onnx(Convolutions(CapsNet().eval()), (torch.zeros(2, 1, 28, 28),), path, ["image"], ["features"])


def reference_cases(
    model_dir: Path, batches: list[int], iters: int, conv_path: Path, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """What the ratios divide by: fp32 onnxruntime, one session on all cores and one batch per core
    side by side (what the service does under load, CAPSNET_PARALLEL_BATCHES), and the conv-only
    ceiling, at each batch size."""
    import onnxruntime as ort

    from capsnet.service.engine import available_cores, session_options

    def session(path: Path, threads: int) -> Any:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(seed)
    sess, one_core = session(model_dir / "capsnet.onnx", 0), session(model_dir / "capsnet.onnx", 1)
    conv = session(conv_path, 0)
    cores = available_cores()
    out: dict[str, list[dict[str, Any]]] = {
        "onnxruntime": [],
        "onnxruntime_side_by_side": [],
        "conv_only_ceiling": [],
    }
    for B in batches:
        x = rng.random((B, 1, 28, 28), dtype=np.float32)
        n = calls_per_case(B, iters)
        samples, core_s = _timed_with_cpu(lambda: sess.run(None, {"image": x}), n)
        out["onnxruntime"].append(latency_stats(samples, B, core_s))
        if cores > 1:
            calls, wall, core_s = _side_by_side(lambda: one_core.run(None, {"image": x}), cores, n)
            row = latency_stats(calls, B, core_s) | {
                "images_per_s": B * len(calls) / wall,
                "batches_at_once": cores,
            }
            out["onnxruntime_side_by_side"].append(row)
        out["conv_only_ceiling"].append(
            latency_stats(timed_calls(lambda: conv.run(None, {"image": x}), n), B)
        )
    return out


def raw_cases(model_dir: Path, batches: list[int], iters: int, tmp: Path) -> dict[str, list[dict[str, Any]]]:
    """The references, then PyTorch eager on the same batches."""
    import torch

    from capsnet.model_export.model import CapsNet

    export_conv_only(tmp / "conv_only.onnx")
    out = reference_cases(model_dir, batches, iters, tmp / "conv_only.onnx")
    torch.manual_seed(0)
    model = CapsNet().eval()
    rng = np.random.default_rng(0)
    out["pytorch_eager"] = []
    for B in batches:
        xt = torch.from_numpy(rng.random((B, 1, 28, 28), dtype=np.float32))
        n = calls_per_case(B, iters)

        def eager() -> None:
            with torch.inference_mode():
                model(xt)

        out["pytorch_eager"].append(latency_stats(timed_calls(eager, n), B))
    return out


def raw_again(model_dir: Path, batches: list[int], iters: int, tmp: Path) -> dict[str, list[dict[str, Any]]]:
    """The references measured a second time, after the HTTP cases. The ratios take the stricter of
    the two passes, so a reference that other work on the machine slowed down in one pass cannot
    make a service figure look better than it is (each row carries "pass": 2)."""
    again = reference_cases(model_dir, batches, iters, tmp / "conv_only.onnx", seed=1)
    return {name: [row | {"pass": 2} for row in rows] for name, rows in again.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(stat_path: str) -> float:
    """utime + stime of a process (/proc/PID/stat) or of one of its threads (/proc/PID/task/TID/stat)."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    cpu = _cpu_seconds(f"/proc/{pid}/stat")
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                rss = int(line.split()[1]) * 1024
    return cpu, rss


def log_tail(log: Any) -> str:
    log.seek(0)
    return str(log.read().decode(errors="replace")[-2000:])


def start_server(cmd: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = tempfile.TemporaryFile()  # noqa: SIM115  (closed with the process below)
    # no gRPC unless asked for (grpc_case): its default port may be taken by a service on this machine
    env = {"CAPSNET_GRPC_PORT": "0", **os.environ, **env}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log  # type: ignore[attr-defined]
    import urllib.request

    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log_tail(log)}") from None
            time.sleep(0.1)
    proc.kill()
    proc.wait(30)
    log.close()
    raise RuntimeError("server did not become ready")


LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "{content_type}"
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
"""


def wrk(
    url: str, body: Path, connections: int, seconds: float, tmp: Path, content_type: str = "image/png"
) -> dict[str, float]:
    script = tmp / "post.lua"
    script.write_text(LUA.replace("{body}", str(body)).replace("{content_type}", content_type))
    res = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    text = res.stdout
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def pct(p: str) -> float:
        m = re.search(rf"^\s*{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        return float(m.group(1)) * units[m.group(2)] if m else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors:.*", text)
    return {
        "connections": connections,
        "requests_per_s": float(rps.group(1)) if rps else 0.0,
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(0) if errors else "",
    }


def batch_totals(port: int) -> tuple[float, float] | None:
    """(images, batches) the server's batchers have run so far, from its /metrics, once nothing is queued
    or running (the last load's stragglers count for it, not for the next); None without /metrics."""
    import urllib.request

    for _ in range(100):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:  # the baseline app has no /metrics
            return None
        if not _total(text, "capsnet_queue_images"):
            break
        time.sleep(0.05)
    return _total(text, "capsnet_batch_images_sum"), _total(text, "capsnet_batch_images_count")


def _total(scrape: str, name: str) -> float:
    """A metric's series summed over their labels (every model), in a Prometheus text scrape."""
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", scrape, re.M))


@dataclass(frozen=True)
class Load:
    """What wrk sends: a case's name, the URL path, the body (a file) and its Content-Type."""

    case: str
    path: str
    body: Path
    content_type: str = "image/png"


def http_cases(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    url_path: str,
    body: Path,
    concurrencies: list[int],
    seconds: float,
    tmp: Path,
) -> list[dict[str, Any]]:
    return loads_on_one_server(cmd, env, [Load(name, url_path, body)], concurrencies, seconds, tmp)


def loads_on_one_server(
    cmd: list[str],
    env: dict[str, str],
    loads: list[Load],
    concurrencies: list[int],
    seconds: float,
    tmp: Path,
    between: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Each load at each concurrency against one server, the loads taking turns at each concurrency
    so that a drift in what else the machine runs falls on all of them alike. `between` is called
    before each pass, while the server idles: for a reference measured in the same minutes."""
    port = free_port()
    proc = start_server([*cmd, "--port", str(port)], port, env)
    try:
        rows = []
        for load in loads:  # warm the connection pool and the code paths
            wrk(f"http://127.0.0.1:{port}{load.path}", load.body, 4, 1.0, tmp, load.content_type)
        loop_stat = f"/proc/{proc.pid}/task/{proc.pid}/stat"  # the main thread: the event loop
        for c in concurrencies:
            if between is not None:
                between()
            for load in loads:
                url = f"http://127.0.0.1:{port}{load.path}"
                batches0 = batch_totals(port)
                cpu0, _ = proc_cpu_rss(proc.pid)
                loop0 = _cpu_seconds(loop_stat)
                t0 = time.perf_counter()
                row = wrk(url, load.body, c, seconds, tmp, load.content_type)
                wall = time.perf_counter() - t0
                cpu1, rss = proc_cpu_rss(proc.pid)
                batches1 = batch_totals(port)
                requests = max(row["requests_per_s"] * wall, 1e-9)
                if batches0 is not None and batches1 is not None and batches1[1] > batches0[1]:
                    # images per inference batch while wrk ran: what the batcher made of the load
                    row["mean_batch"] = (batches1[0] - batches0[0]) / (batches1[1] - batches0[1])
                row.update(
                    {
                        "case": load.case,
                        "server_cpu_cores": (cpu1 - cpu0) / wall,
                        "server_core_ms_per_request": (cpu1 - cpu0) * 1e3 / requests,
                        "event_loop_core_ms_per_request": (_cpu_seconds(loop_stat) - loop0) * 1e3 / requests,
                        "server_rss_mb": rss / 2**20,
                    }
                )
                rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(30)
        proc.log.close()  # type: ignore[attr-defined]


# -- the forms a request's images come in: each should cost the service its own work and no more

FORM_NONE, FORM_DEFAULT, FORM_SCAN = "PNG, preprocess=none", "PNG, no query (mnist)", "scan, no query (mnist)"
FORM_JSON, FORM_MULTIPART, FORM_V2 = "JSON images", "multipart PNG, no query (mnist)", "v2 JSON"
FORM_CONCURRENCIES = [1, 32]
SCAN = ROOT / "examples" / "7.png"  # a 227x224 scan of a handwritten 7


def input_forms(digit: np.ndarray, model: str, tmp: Path) -> list[tuple[Load, Any]]:
    """Each form as wrk sends it, with the work the service must do for it alone (a callable): the
    preprocessing of an upload, the parsing and checking of a JSON body."""
    import orjson
    from PIL import Image

    from capsnet.service.preprocess import preprocess_bytes, validate_array
    from capsnet.service.protocol import Signature, TensorSpec, parse_infer_request

    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, format="PNG")
    png, scan, grid = buf.getvalue(), SCAN.read_bytes(), (digit / 255.0).tolist()
    boundary = "capsnet-bench-boundary"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
    multipart = part.encode() + b"Content-Type: image/png\r\n\r\n" + png + f"\r\n--{boundary}--\r\n".encode()
    json_body = orjson.dumps({"images": [grid]})
    image = TensorSpec("image", "FP32", "<f4", [-1, 1, 28, 28])
    outputs = [
        TensorSpec("probabilities", "FP32", "<f4", [-1, 10]),
        TensorSpec("poses", "FP32", "<f4", [-1, 10, 16]),
    ]
    signature = Signature(model, "1", [image], outputs)
    v2 = orjson.dumps(  # asking for the outputs /predict answers with, as the gRPC case does
        {
            "inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": grid}],
            "outputs": [{"name": name} for name in GRPC_OUTPUTS],
        }
    )
    files = {}
    for name, data in {"digit.png": png, "scan.png": scan, "images.json": json_body, "multipart": multipart,
                       "v2.json": v2}.items():  # fmt: skip
        files[name] = tmp / name
        files[name].write_bytes(data)
    mnist = lambda data: lambda: preprocess_bytes(data, mode="mnist", max_pixels=16_000_000)  # noqa: E731
    return [
        (Load(FORM_NONE, "/predict?preprocess=none", files["digit.png"]),
         lambda: preprocess_bytes(png, mode="none", max_pixels=16_000_000)),
        (Load(FORM_DEFAULT, "/predict", files["digit.png"]), mnist(png)),
        (Load(FORM_SCAN, "/predict", files["scan.png"]), mnist(scan)),
        (Load(FORM_JSON, "/predict", files["images.json"], "application/json"),
         lambda: [validate_array(a) for a in orjson.loads(json_body)["images"]]),
        (Load(FORM_MULTIPART, "/predict", files["multipart"], f"multipart/form-data; boundary={boundary}"),
         mnist(png)),
        (Load(FORM_V2, f"/v2/models/{model}/infer", files["v2.json"], "application/json"),
         lambda: parse_infer_request(v2, b"", signature, 64)),
    ]  # fmt: skip


def own_costs(
    work: Any,
    between: Any,
    calls: int,
    warm: list[float],
    cold: list[float],
    after: list[float] | None = None,
) -> None:
    """Time `calls` calls of `work` by itself twice over, appending seconds: to `warm`, a call right after
    another of its own (its code and data in the caches), and to `cold`, a call right after one of
    `between` (untimed), as in the service, where an inference has just passed its weights through the
    caches. The two alternate, so that a slow or fast phase of a shared machine falls on both. `after`:
    the call of `between` that follows each cold one, timed (the inference as the work left the
    caches): cold + after is what one request at a time costs in one process, without a server."""
    for _ in range(calls):
        work()
        t0 = time.perf_counter()
        work()
        t1 = time.perf_counter()
        between()
        t2 = time.perf_counter()
        work()
        t3 = time.perf_counter()
        warm.append(t1 - t0)
        cold.append(t3 - t2)
        if after is not None:
            between()
            after.append(time.perf_counter() - t3)


# Each form's turn at each concurrency comes this often, in the same total time, for a median against
# drift: with two the "median" is a mean, and one slow minute of a shared VM moves it (--quick: 2).
FORM_ROUNDS = 6
FORM_REFERENCE = "onnxruntime alone, between the forms"
OWN_CALLS_PER_PASS = 10  # each form's own work, timed this often (alone and after an inference) per pass


def form_cases(
    model_dir: Path,
    serve: list[str],
    digit: np.ndarray,
    seconds: float,
    iters: int,
    tmp: Path,
    best_batch: int,
    rounds: int = FORM_ROUNDS,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The input forms against one server, taking turns (`rounds` rounds of seconds / rounds each,
    the medians kept), each row with the form's own cost alone and right after an inference; before
    each pass, in the same minutes, raw onnxruntime at `best_batch` (the median of those) and the
    forms' own costs (the medians of all their calls)."""
    import onnxruntime as ort

    from capsnet.service.engine import available_cores, session_options

    sess = ort.InferenceSession(
        str(model_dir / "capsnet.onnx"),
        session_options(available_cores()),
        providers=["CPUExecutionProvider"],
    )
    meta = sess.get_modelmeta().custom_metadata_map
    forms = input_forms(digit, meta.get("name", model_dir.name), tmp)  # (the name v2 routes by)
    one = {"image": (digit[None, None] / 255.0).astype(np.float32)}
    infer = lambda: sess.run(None, one)  # noqa: E731
    # Each form's own work is timed before every pass too, in the same minutes as the passes.
    own: dict[str, list[float]] = {load.case: [] for load, _ in forms}
    cold: dict[str, list[float]] = {load.case: [] for load, _ in forms}
    after: dict[str, list[float]] = {load.case: [] for load, _ in forms}
    for _, work in forms:  # warm-up
        own_costs(work, infer, 5, [], [])
    env = {"CAPSNET_LOG_LEVEL": "warning"}
    loads, per_round = [load for load, _ in forms], seconds / rounds
    concs = [c for c in FORM_CONCURRENCIES for _ in range(rounds)]  # [1, 1, ..., 32, 32, ...]
    batch = {"image": np.repeat(one["image"], best_batch, axis=0)}
    passes: list[float] = []

    def between_passes() -> None:
        # raw onnxruntime: images/s as the raw rows have it, batch / median latency
        samples = timed_calls(lambda: sess.run(None, batch), calls_per_case(best_batch, iters), warmup=1)
        passes.append(latency_stats(samples, best_batch)["images_per_s"])
        for load, work in forms:
            own_costs(work, infer, OWN_CALLS_PER_PASS, own[load.case], cold[load.case], after[load.case])

    runs = loads_on_one_server(serve, env, loads, concs, per_round, tmp, between=between_passes)
    reference = {"batch": best_batch, "images_per_s": float(np.median(passes)), "passes": passes}
    rows = []
    for case in [load.case for load in loads]:
        for c in FORM_CONCURRENCIES:
            mine = [r for r in runs if r["case"] == case and r["connections"] == c]
            row = {
                k: float(np.median([r[k] for r in mine])) for k in MEDIAN_KEYS if all(k in r for r in mine)
            }
            row |= {"case": case, "connections": c, "rounds": len(mine), "non_2xx": sum(r["non_2xx"] for r in mine),
                    "server_rss_mb": max(r["server_rss_mb"] for r in mine)}  # fmt: skip
            row |= {"own_cost_ms": float(np.median(own[case]) * 1e3),
                    "own_cost_after_inference_ms": float(np.median(cold[case]) * 1e3),
                    "inference_after_own_ms": float(np.median(after[case]) * 1e3),
                    "in_process_ms": float(np.median(np.add(cold[case], after[case])) * 1e3),
                    "own_cost_calls": len(own[case])}  # fmt: skip
            rows.append(row)
    return rows, reference


MEDIAN_KEYS = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_cores", "server_core_ms_per_request",
               "event_loop_core_ms_per_request", "mean_batch")  # fmt: skip


GRPC_BATCH, GRPC_STREAMS, GRPC_OUTPUTS = 64, 4, ["probabilities", "poses"]


def grpc_case(model_dir: Path, serve: list[str], seconds: float, iters: int, rounds: int) -> dict[str, Any]:
    """B = 64 images per ModelInfer (raw_input_contents) from a few concurrent tritonclient.grpc
    streams, beside raw onnxruntime at B = 64 with the same outputs: `rounds` turns of onnxruntime
    alone, then `seconds / rounds` of gRPC load (the server idles while onnxruntime runs), so that a
    drift in what else the shared machine runs falls on both alike."""
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort
    import tritonclient.grpc as grpcclient

    from capsnet.service.engine import session_options

    B = GRPC_BATCH
    x = np.random.default_rng(0).random((B, 1, 28, 28), dtype=np.float32)
    sess = ort.InferenceSession(
        str(model_dir / "capsnet.onnx"), session_options(0), providers=["CPUExecutionProvider"]
    )
    n = max(5, iters // (2 * rounds))
    port, grpc_port = free_port(), free_port()
    env = {
        "CAPSNET_LOG_LEVEL": "warning",
        "CAPSNET_GRPC_PORT": str(grpc_port),
        "CAPSNET_MAX_BATCH_SIZE": str(B),
    }
    proc = start_server([*serve, "--port", str(port)], port, env)
    clients = [grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") for _ in range(GRPC_STREAMS)]
    ort_samples: list[float] = []
    ort_rounds, grpc_rounds, latencies = [], [], []
    wall = cpu = 0.0
    try:
        name = served_model_name(port)
        image = grpcclient.InferInput("image", list(x.shape), "FP32")
        image.set_data_from_numpy(x)
        outputs = [grpcclient.InferRequestedOutput(n) for n in GRPC_OUTPUTS]
        for c in clients:  # warm each channel
            assert c.infer(name, [image], outputs=outputs).as_numpy("probabilities").shape == (B, 10)

        def stream(c: Any, end: float) -> list[float]:
            out = []
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                c.infer(name, [image], outputs=outputs)
                out.append(time.perf_counter() - t0)
            return out

        for _ in range(rounds):
            samples = timed_calls(lambda: sess.run(GRPC_OUTPUTS, {"image": x}), n)
            ort_samples += samples
            ort_rounds.append(latency_stats(samples, B)["images_per_s"])
            cpu0, _ = proc_cpu_rss(proc.pid)
            t0 = time.perf_counter()
            end = t0 + seconds / rounds
            with ThreadPoolExecutor(GRPC_STREAMS) as pool:
                per_stream = list(pool.map(stream, clients, [end] * len(clients)))
            round_wall = time.perf_counter() - t0
            cpu1, rss = proc_cpu_rss(proc.pid)
            calls = sum(len(s) for s in per_stream)
            grpc_rounds.append(calls * B / round_wall)
            latencies += [t for s in per_stream for t in s]
            wall, cpu = wall + round_wall, cpu + cpu1 - cpu0
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(30)
        proc.log.close()  # type: ignore[attr-defined]
    latencies.sort()
    calls = len(latencies)
    return {
        "case": "gRPC ModelInfer",
        "batch": B,
        "streams": GRPC_STREAMS,
        "outputs": GRPC_OUTPUTS,
        "calls": calls,
        "images_per_s": calls * B / wall,
        "p50_ms": 1e3 * latencies[calls // 2],
        "p99_ms": 1e3 * latencies[min(calls - 1, int(calls * 0.99))],
        "server_cpu_cores": cpu / wall,
        "server_rss_mb": rss / 2**20,
        "onnxruntime_b64": latency_stats(ort_samples, B),  # every round's runs together
        "rounds": {"onnxruntime_images_per_s": ort_rounds, "grpc_images_per_s": grpc_rounds},
    }


def served_model_name(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata", timeout=10) as r:
        return str(json.load(r)["name"])


def run(*, model_dir: Path, quick: bool, iterations: int, seconds: float) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("python -m bench needs wrk (Debian package `wrk`) for the HTTP load")
    batches = [1, 8, 32, 128]
    concurrencies = [1, 8, 32, 64]
    iters, seconds = (3, 2.0) if quick else (iterations, seconds)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        from PIL import Image

        from capsnet.model_export.data import load_split

        x, _ = load_split("mnist", "test")
        body = tmp / "digit.png"
        Image.fromarray(x[0]).save(body)  # a 28x28 MNIST digit: preprocessing cost stays out of the ratio
        int8 = (model_dir / INT8_FILE).exists()
        result: dict[str, Any] = {
            "machine": machine(),
            "quick": quick,
            "raw": raw_cases(model_dir, batches, iters, tmp),
        }
        if int8:
            result["raw"] |= raw_int8_cases(model_dir, batches, iters)
        py = sys.executable
        serve = [py, "-m", "capsnet", "--log-level", "WARNING", "serve", "--model-dir", str(model_dir)]
        http: list[dict[str, Any]] = []
        http += http_cases(
            "service, batcher on",
            serve,
            {"CAPSNET_LOG_LEVEL": "warning"},
            "/predict?preprocess=none",
            body,
            concurrencies,
            seconds,
            tmp,
        )
        if int8:
            http += http_cases(
                "service int8, batcher on",
                serve,
                {"CAPSNET_LOG_LEVEL": "warning", "CAPSNET_PRECISION": "int8"},
                "/predict?preprocess=none",
                body,
                concurrencies,
                seconds,
                tmp,
            )
        http += http_cases(
            "service, batcher off",
            serve,
            {"CAPSNET_LOG_LEVEL": "warning", "CAPSNET_MAX_BATCH_SIZE": "1", "CAPSNET_MAX_WAIT_MS": "0"},
            "/predict?preprocess=none",
            body,
            concurrencies,
            seconds,
            tmp,
        )
        best = max(result["raw"]["onnxruntime"], key=lambda row: row["images_per_s"])["batch"]
        rounds = 2 if quick else FORM_ROUNDS
        forms, result["forms_reference"] = form_cases(
            model_dir, serve, x[0], seconds, iters, tmp, best, rounds
        )
        http += forms
        base = [py, "-m", "uvicorn", "bench.baseline_app:app", "--log-level", "warning"]
        http += http_cases(
            "FastAPI + PyTorch baseline",
            base,
            {"PYTHONPATH": str(ROOT)},
            "/predict",
            body,
            [1, 32],
            seconds,
            tmp,
        )
        result["http"] = http
        result["grpc"] = grpc_case(model_dir, serve, seconds, iters, rounds=1 if quick else 3)
        result["raw_again"] = raw_again(model_dir, batches, iters, tmp)
    from bench.profile import profile

    # onnxruntime's own profile at B = 32: where inference time goes, the evidence behind the ratios.
    result["profile"] = profile(model_dir, batch=32, runs=3 if quick else 10)
    if (model_dir / INT8_FILE).exists():
        result["profile_int8"] = profile(model_dir, batch=32, runs=3 if quick else 10, file=INT8_FILE)
    result["ratios"] = ratios(result)
    if "onnxruntime_int8" in result["raw"]:
        result["ratios"] |= int8_ratios(result)
    result["ratios"] |= form_ratios(result)
    return result


# name: (target as printed, limit, +1 when higher is better / -1 when lower is)
TARGETS = {
    "service_c32_vs_ort_best": (">= 0.90", 0.90, 1),
    "overhead_ms_per_request": ("<= 0.4", 0.4, -1),
    "service_c1_p50_minus_ort_b1_ms": ("<= 0.5", 0.5, -1),
    "ort_best_vs_conv_ceiling": (">= 0.85", 0.85, 1),
    "service_c32_vs_baseline_c32": (">= 5", 5.0, 1),
    "grpc_b64_vs_ort_b64": (">= 0.90", 0.90, 1),
}


def references(r: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The rows of one raw case from both passes (`raw`, and `raw_again` where the run has it)."""
    return [*r["raw"].get(name, []), *r.get("raw_again", {}).get(name, [])]


def http_row(r: dict[str, Any], case: str, connections: int) -> dict[str, Any]:
    """The HTTP case `case` at `connections` of a run."""
    return next(h for h in r["http"] if h["case"] == case and h["connections"] == connections)


def ratios(r: dict[str, Any]) -> dict[str, Any]:
    # Each reference is the stricter of the two passes: the faster onnxruntime, the faster ceiling.
    ort = references(r, "onnxruntime")
    ort_best = max(ort, key=lambda s: s["images_per_s"])  # one session, its best batch
    # onnxruntime's own cost per image at its cheapest (one batch on all cores, or one batch per core
    # side by side, as the service runs under load): what is left of a request's core time is Python's
    ort_cheapest = min(ort + references(r, "onnxruntime_side_by_side"), key=lambda s: s["core_ms_per_image"])
    ort_b1 = min((s for s in ort if s["batch"] == 1), key=lambda s: s["p50_ms"])
    conv_best = max(references(r, "conv_only_ceiling"), key=lambda s: s["images_per_s"])

    on32, on1 = http_row(r, "service, batcher on", 32), http_row(r, "service, batcher on", 1)
    base32 = http_row(r, "FastAPI + PyTorch baseline", 32)
    values = {
        "service_c32_vs_ort_best": on32["requests_per_s"] / ort_best["images_per_s"],
        # the server's core time per request beyond what onnxruntime itself needs per image
        "overhead_ms_per_request": on32["server_core_ms_per_request"] - ort_cheapest["core_ms_per_image"],
        "service_c1_p50_minus_ort_b1_ms": on1["p50_ms"] - ort_b1["p50_ms"],
        "ort_best_vs_conv_ceiling": ort_best["images_per_s"] / conv_best["images_per_s"],
        "service_c32_vs_baseline_c32": on32["requests_per_s"] / max(base32["requests_per_s"], 1e-9),
        "grpc_b64_vs_ort_b64": r["grpc"]["images_per_s"] / r["grpc"]["onnxruntime_b64"]["images_per_s"],
    }
    whys = explanations(r, ort_best, ort_cheapest, on32, on1, ort_b1, base32)
    return judged(values, whys, TARGETS)


def judged(
    values: dict[str, float], whys: dict[str, str], targets: dict[str, tuple[str, float, int]]
) -> dict[str, Any]:
    """Each ratio with its target, whether it is met and what it is made of."""
    out = {}
    for name, value in values.items():
        target, limit, sign = targets[name]
        out[name] = {
            "value": value,
            "target": target,
            "met": bool(sign * value >= sign * limit),
            "why": whys[name],
        }
    return out


def form(row: dict[str, Any]) -> str:
    """How a raw row ran: its batch, and how many batches ran at once if more than one."""
    at_once = row.get("batches_at_once", 1)
    again = ", measured again after the HTTP cases" if row.get("pass") == 2 else ""
    return f"B = {row['batch']}" + (f", {at_once} batches side by side" if at_once > 1 else "") + again


def per_run_cost(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(c, F) of core ms per image = c + F / B, least squares over the rows' batches (each batch's
    faster row): c is onnxruntime's cost per image at any batch, F what each run costs on top."""
    best: dict[int, float] = {}
    for row in rows:
        best[row["batch"]] = min(best.get(row["batch"], float("inf")), row["core_ms_per_image"])
    x = np.array([1.0 / b for b in best])
    y = np.array(list(best.values()))
    fixed, c = np.polyfit(x, y, 1) if len(best) > 1 else (0.0, float(y[0]))
    return float(c), float(fixed)


def explanations(
    r: dict[str, Any],
    ort_best: dict[str, Any],
    ort_cheapest: dict[str, Any],
    on32: dict[str, Any],
    on1: dict[str, Any],
    ort_b1: dict[str, Any],
    base32: dict[str, Any],
) -> dict[str, str]:
    """What each ratio is made of, from figures of the same run (the JSON explains itself)."""
    cores = r["machine"]["cores"] or 1
    ort_core_ms = ort_cheapest["core_ms_per_image"]
    service_core_ms = on32["server_core_ms_per_request"]
    loop_ms = on32["event_loop_core_ms_per_request"]
    prof = r.get("profile") or {}
    others = [f"{op} {share:.1%}" for op, share in prof.get("by_op", {}).items() if op != "Conv"][:5]
    overhead = service_core_ms - ort_core_ms
    g = r["grpc"]
    batch_part = ""
    if "mean_batch" in on32:
        # onnxruntime's own cost per image as c + F / B (F: each run's fixed cost), fitted to the
        # side-by-side rows (the faster pass at each batch): over the images of batches of any sizes
        # that is c + F / mean batch, since each batch of B images adds B * (1 / B) = 1 to the sum of 1 / B
        c, fixed = per_run_cost(references(r, "onnxruntime_side_by_side") or references(r, "onnxruntime"))
        at_mean = c + fixed / on32["mean_batch"]
        batch_ms = max(0.0, at_mean - ort_core_ms)
        batch_part = (
            f"; the batcher's batches held {on32['mean_batch']:.1f} images on average, where onnxruntime "
            f"alone needs {at_mean:.2f} ms per image ({c:.2f} + {fixed:.2f} / B, fitted to its side-by-side "
            f"rows): {batch_ms:.2f} ms of the {overhead:.2f} is that batch size, {overhead - batch_ms:.2f} ms "
            "the service's own"
        )
    return {
        "grpc_b64_vs_ort_b64": (
            f"{g['streams']} tritonclient.grpc streams of B = {g['batch']} ({'+'.join(g['outputs'])} out): "
            f"{g['images_per_s']:.0f} images/s, {g['p50_ms']:.1f} ms p50 per call, the server on "
            f"{g['server_cpu_cores']:.2f} of {cores} cores (the clients share them); onnxruntime alone at "
            f"B = {g['batch']}: {g['onnxruntime_b64']['images_per_s']:.0f} images/s, "
            f"{g['onnxruntime_b64']['p50_ms']:.1f} ms per batch"
        ),
        "overhead_ms_per_request": (
            f"{service_core_ms:.2f} ms of server core time per request at concurrency 32 against "
            f"{ort_core_ms:.2f} ms per image for onnxruntime alone at its cheapest ({form(ort_cheapest)}): "
            f"{overhead:.2f} ms beyond inference; the event loop's thread (HTTP, decoding, batching, JSON) "
            f"used {loop_ms:.2f} ms per request, the rest is the inference threads' Python and onnxruntime "
            f"at the service's batch sizes{batch_part}"
        ),
        "service_c32_vs_ort_best": (
            f"at concurrency 32 the server used {on32['server_cpu_cores']:.2f} of {cores} cores for "
            f"{on32['requests_per_s']:.0f} requests/s, {service_core_ms:.1f} ms of core time per request; "
            f"onnxruntime alone, one session at its best batch ({form(ort_best)}), does "
            f"{ort_best['images_per_s']:.0f} images/s; at its cheapest ({form(ort_cheapest)}) it needs "
            f"{ort_core_ms:.1f} ms of core time per image, so {overhead:.1f} ms per request went to HTTP, "
            "decoding, batching and JSON on the same cores"
        ),
        "service_c1_p50_minus_ort_b1_ms": (
            f"{on1['p50_ms']:.2f} ms for a request at concurrency 1 against {ort_b1['p50_ms']:.2f} ms for "
            f"onnxruntime at {form(ort_b1)}: the difference is HTTP, decoding, the hop to the inference "
            "thread and JSON"
        ),
        "ort_best_vs_conv_ceiling": (
            f"convolutions are {prof.get('conv_share', float('nan')):.1%} of onnxruntime's kernel time at "
            f"B = {prof.get('batch')}; the rest is the routing: {', '.join(others)} (memory-bound: see "
            "capsnet/model_export/capsules.py, route_without_votes)"
        ),
        "service_c32_vs_baseline_c32": (
            f"the baseline answered {base32['requests_per_s']:.0f} requests/s; raw onnxruntime at its best "
            f"batch is {ort_best['images_per_s'] / max(base32['requests_per_s'], 1e-9):.2f} times that, the "
            "most any service on this onnxruntime could reach on these cores"
        ),
    }


INT8_TARGETS = {
    "int8_best_vs_fp32_best": (">= 2.0", 2.0, 1),
    "service_int8_c32_vs_baseline_c32": (">= 5", 5.0, 1),
}


def int8_ratios(r: dict[str, Any]) -> dict[str, Any]:
    """The int8 targets: raw int8 against raw fp32 at each one's best batch, and the int8 service at
    concurrency 32 against the FastAPI + PyTorch baseline."""
    fp32 = max(references(r, "onnxruntime"), key=lambda s: s["images_per_s"])  # as `ratios` takes it
    int8 = max(r["raw"]["onnxruntime_int8"], key=lambda s: s["images_per_s"])
    on32 = http_row(r, "service int8, batcher on", 32)
    base32 = http_row(r, "FastAPI + PyTorch baseline", 32)
    prof = r.get("profile_int8") or {}
    others = [f"{op} {share:.1%}" for op, share in prof.get("by_op", {}).items() if op != "QLinearConv"][:5]
    ext = r["machine"]["vector_extensions"]
    values = {
        "int8_best_vs_fp32_best": int8["images_per_s"] / fp32["images_per_s"],
        "service_int8_c32_vs_baseline_c32": on32["requests_per_s"] / max(base32["requests_per_s"], 1e-9),
    }
    whys = {
        "int8_best_vs_fp32_best": (
            f"int8 {int8['images_per_s']:.0f} images/s at B = {int8['batch']} against fp32 "
            f"{fp32['images_per_s']:.0f} at {form(fp32)} (alternating call by call at B = {int8['batch']}: "
            f"{int8['vs_fp32_alternating']:.2f}x); int8 kernels: {ext['int8_kernels']}; in the int8 graph "
            f"the convolutions are {prof.get('conv_share', float('nan')):.1%} of kernel time, the rest is the "
            f"fp32 routing: {', '.join(others)}"
        ),
        "service_int8_c32_vs_baseline_c32": (
            f"the int8 service answered {on32['requests_per_s']:.0f} requests/s at concurrency 32 "
            f"({on32['server_core_ms_per_request']:.2f} ms of server core time per request, "
            f"{on32['event_loop_core_ms_per_request']:.2f} of it on the event loop's thread), the baseline "
            f"{base32['requests_per_s']:.0f}; raw int8 at its best batch is "
            f"{int8['images_per_s'] / max(base32['requests_per_s'], 1e-9):.2f} times the baseline"
        ),
    }
    return judged(values, whys, INT8_TARGETS)


FORM_TARGETS = {
    "default_c32_vs_none_c32": (">= 0.90", 0.90, 1),
    "default_c1_p50_beyond_none_and_preprocessing_ms": ("<= 0.2", 0.2, -1),
    "scan_c1_added_vs_preprocessing": ("<= 1.3", 1.3, -1),
    "json_c32_vs_ort_best": (">= 0.90", 0.90, 1),
}


def form_split(r: dict[str, Any], case: str, connections: int) -> dict[str, float]:
    """What a form costs the server beyond a PNG taken as it is, at one concurrency: core ms per
    request in all, on the event loop's thread, the form's own work (timed alone, and right after an
    inference as the service meets it), and the rest beyond the latter: hand-offs and waiting (to
    threads, between them, for the GIL)."""
    row, none = http_row(r, case, connections), http_row(r, FORM_NONE, connections)
    beyond = row["server_core_ms_per_request"] - none["server_core_ms_per_request"]
    own = row["own_cost_ms"] - none["own_cost_ms"]
    cold = row["own_cost_after_inference_ms"] - none["own_cost_after_inference_ms"]
    split = {
        "core_ms": row["server_core_ms_per_request"],
        "beyond_none_core_ms": beyond,
        "loop_beyond_none_ms": row["event_loop_core_ms_per_request"] - none["event_loop_core_ms_per_request"],
        "own_work_ms": own,
        "own_work_after_inference_ms": cold,
        "hand_offs_ms": beyond - cold,
        "p50_beyond_none_ms": row["p50_ms"] - none["p50_ms"],
    }
    if connections == 1 and "in_process_ms" in row:  # (result files before 2026-12-08 lack it)
        # One request at a time without a server: the form's work right after an inference, then the
        # next inference, in one process. What the server's p50 adds beyond that is the server's own
        # (under load the p50 is mostly queueing, so only concurrency 1 is held against it).
        split["in_process_beyond_none_ms"] = row["in_process_ms"] - none["in_process_ms"]
        split["server_beyond_in_process_ms"] = (
            split["p50_beyond_none_ms"] - split["in_process_beyond_none_ms"]
        )
    return split


def form_ratios(r: dict[str, Any]) -> dict[str, Any]:
    """The input forms' targets: the default path (a PNG, no query) and the scan against a PNG taken as
    it is, and a JSON body against raw onnxruntime at its best batch."""
    none1, default1, scan1 = (http_row(r, case, 1) for case in (FORM_NONE, FORM_DEFAULT, FORM_SCAN))
    none32, default32, json32 = (http_row(r, case, 32) for case in (FORM_NONE, FORM_DEFAULT, FORM_JSON))
    ort_best = max(references(r, "onnxruntime"), key=lambda s: s["images_per_s"])
    # Raw onnxruntime at its best batch as measured between the forms' passes: the same minutes as the
    # JSON load, so that a slow or fast phase of a shared machine falls on both (the raw passes before
    # and after the HTTP cases are minutes away from it; their best is in the explanation).
    ort_json = r["forms_reference"]
    fn_default, fn_scan = default1["own_cost_ms"], scan1["own_cost_ms"]
    values = {
        "default_c32_vs_none_c32": default32["requests_per_s"] / none32["requests_per_s"],
        "default_c1_p50_beyond_none_and_preprocessing_ms": default1["p50_ms"] - none1["p50_ms"] - fn_default,
        "scan_c1_added_vs_preprocessing": (scan1["p50_ms"] - none1["p50_ms"]) / fn_scan,
        "json_c32_vs_ort_best": json32["requests_per_s"] / ort_json["images_per_s"],
    }

    def split(case: str, c: int) -> str:
        s = form_split(r, case, c)
        text = (
            f"{case} at concurrency {c}: {s['core_ms']:.2f} core ms per request, {s['beyond_none_core_ms']:+.2f} "
            f"beyond a PNG taken as it is: its own work {s['own_work_ms']:.2f} ms timed alone, "
            f"{s['own_work_after_inference_ms']:.2f} ms right after an inference (its code and data evicted), the "
            f"event loop's thread {s['loop_beyond_none_ms']:+.2f} ms, hand-offs and waiting {s['hand_offs_ms']:+.2f} ms"
        )
        if "in_process_beyond_none_ms" in s:
            text += (
                f"; without a server, in one process (its work right after an inference, then the next "
                f"inference) it takes {s['in_process_beyond_none_ms']:.2f} ms more than a PNG taken as it is, "
                f"so the server's p50 adds {s['server_beyond_in_process_ms']:+.2f} ms of its own"
            )
        return text

    whys = {
        "default_c32_vs_none_c32": (
            f"{default32['requests_per_s']:.0f} requests/s for a 28x28 PNG with no query against "
            f"{none32['requests_per_s']:.0f} with preprocess=none, on one server, taking turns; {split(FORM_DEFAULT, 32)}"
        ),
        "default_c1_p50_beyond_none_and_preprocessing_ms": (
            f"p50 {default1['p50_ms']:.2f} ms against {none1['p50_ms']:.2f} with preprocess=none; preprocess_bytes "
            f"itself takes {fn_default:.2f} ms on that PNG; {split(FORM_DEFAULT, 1)}"
        ),
        "scan_c1_added_vs_preprocessing": (
            f"the 227x224 scan's p50 {scan1['p50_ms']:.2f} ms, {scan1['p50_ms'] - none1['p50_ms']:.2f} ms more "
            f"than a PNG taken as it is, where preprocess_bytes itself takes {fn_scan:.2f} ms ("
            f"{(scan1['p50_ms'] - none1['p50_ms']) / scan1['own_cost_after_inference_ms']:.2f} x the "
            f"{scan1['own_cost_after_inference_ms']:.2f} ms it takes right after an inference); {split(FORM_SCAN, 1)}"
        ),
        "json_c32_vs_ort_best": (
            f'{{"images": [28x28]}} bodies: {json32["requests_per_s"]:.0f} requests/s against raw onnxruntime\'s '
            f"{ort_json['images_per_s']:.0f} images/s at its best batch (B = {ort_json['batch']}), the median "
            f"of {len(ort_json['passes'])} runs between the forms' passes (its best in the raw passes before "
            f"and after the HTTP cases: {ort_best['images_per_s']:.0f}, {form(ort_best)})"
            f"; {split(FORM_JSON, 32)}"
        ),
    }
    return judged(values, whys, FORM_TARGETS)


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}, torch {m['torch']}")
    if "vector_extensions" in m:
        ext = m["vector_extensions"]
        print(
            f"vector extensions: {' '.join(ext['present']) or 'none'}; lacks: {' '.join(ext['missing']) or 'none'}; "
            f"int8 kernels: {ext['int8_kernels']}"
        )
    print(f"\n{'raw inference':<26}{'B':>5}{'p50 ms':>10}{'p99 ms':>10}{'images/s':>11}{'core ms/img':>12}")
    for suffix, cases in (("", r["raw"]), (", again", r.get("raw_again", {}))):
        for name, rows in cases.items():
            for s in rows:
                core = f"{s['core_ms_per_image']:>12.2f}" if "core_ms_per_image" in s else ""
                label = name + suffix
                print(
                    f"{label:<26}{s['batch']:>5}{s['p50_ms']:>10.2f}{s['p99_ms']:>10.2f}{s['images_per_s']:>11.1f}{core}"
                )
    print(
        f"\n{'HTTP /predict (wrk)':<28}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non2xx':>8}{'cpu':>6}{'ms/req':>8}{'loop':>6}{'batch':>6}{'RSS MB':>8}"
    )
    for h in r["http"]:
        print(
            f"{h['case']:<28}{h['connections']:>5}{h['requests_per_s']:>9.1f}{h['p50_ms']:>9.2f}{h['p99_ms']:>9.2f}"
            f"{h['non_2xx']:>8}{h['server_cpu_cores']:>6.2f}{h['server_core_ms_per_request']:>8.2f}"
            f"{h['event_loop_core_ms_per_request']:>6.2f}"
            f"{h.get('mean_batch', float('nan')):>6.1f}{h['server_rss_mb']:>8.0f}"
        )
    forms = [h for h in r["http"] if "own_cost_ms" in h and h["case"] != FORM_NONE]
    if forms:
        print(
            f"\n{'input forms, beyond PNG none':<32}{'conc':>5}{'own ms':>8}{'cold':>6}{'core ms':>9}{'loop':>7}"
            f"{'hand-offs':>10}{'p50':>7}{'1 process':>10}{'server':>8}"
        )
        for h in forms:
            sp = form_split(r, h["case"], h["connections"])
            alone = (
                f"{sp['in_process_beyond_none_ms']:>+10.2f}{sp['server_beyond_in_process_ms']:>+8.2f}"
                if "in_process_beyond_none_ms" in sp
                else ""
            )
            print(
                f"{h['case']:<32}{h['connections']:>5}{sp['own_work_ms']:>8.2f}{sp['own_work_after_inference_ms']:>6.2f}"
                f"{sp['beyond_none_core_ms']:>+9.2f}"
                f"{sp['loop_beyond_none_ms']:>+7.2f}{sp['hand_offs_ms']:>+10.2f}{sp['p50_beyond_none_ms']:>+7.2f}{alone}"
            )
    ref = r["forms_reference"]
    passes = ", ".join(f"{v:.0f}" for v in ref["passes"])
    print(f"{FORM_REFERENCE}: B = {ref['batch']}, {ref['images_per_s']:.1f} images/s (median of {passes})")
    g = r["grpc"]
    print(
        f"\n{'gRPC ModelInfer':<28}{'B':>5}{'streams':>8}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu':>6}{'ORT B=64 img/s':>16}"
    )
    print(
        f"{'tritonclient.grpc, raw':<28}{g['batch']:>5}{g['streams']:>8}{g['images_per_s']:>10.1f}{g['p50_ms']:>9.2f}"
        f"{g['p99_ms']:>9.2f}{g['server_cpu_cores']:>6.2f}{g['onnxruntime_b64']['images_per_s']:>16.1f}"
    )
    print("\nratios and their targets:")
    for k, v in r["ratios"].items():
        print(f"  {k:<34}{v['value']:>8.3f}  target {v['target']:<7} {'met' if v['met'] else 'NOT met'}")
        print(f"    {v['why']}")


def main(*, model_dir: Path, output: Path, quick: bool, iterations: int, seconds: float) -> None:
    result = run(model_dir=model_dir, quick=quick, iterations=iterations, seconds=seconds)
    print_table(result)
    out = output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten to {out}")
