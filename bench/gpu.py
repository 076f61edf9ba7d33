"""GPU inference, side by side in one run: PyTorch eager against onnxruntime's CUDA provider, plainly
(numpy in and out), with IOBinding, with CUDA graphs over fixed batch buckets, and the fp16 variant;
plus accuracy of each precision on the MNIST test images, and optionally the service over HTTP.

    python -m bench.gpu --output bench/results/gpu.json          # on a machine with a GPU
    python -m bench.gpu --device cpu --iters 3 --batches 1 4     # what CI runs: the same code on a CPU

Every case copies the input from host memory and the outputs /predict needs (probabilities, poses) back
to it, as the service must; only the coupling tensor (35 MB per 256 images) stays on the device where the
case allows it. A case the provider cannot run is recorded with its error, not dropped.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench import latency_stats, timed_calls

ROOT = Path(__file__).resolve().parent.parent
SERVED = ("probabilities", "poses")  # what /predict reads back


def http_cases(workers: int) -> list[tuple[str, int, int]]:
    """(label, CAPSNET_MAX_BATCH_SIZE, uvicorn workers) of each server configuration."""
    return [("batcher_on", 64, 1), ("batcher_off", 1, 1), (f"batcher_on_{workers}_workers", 64, workers)]


def static_batch(model: Any, batch: int) -> Any:
    """A copy of an ONNX model whose batch axis is fixed, so its shape arithmetic folds into constants
    and every node can run inside one captured CUDA graph (the exported classifier holds no control
    flow, which a CUDA graph could not capture)."""
    import copy

    fixed = copy.deepcopy(model)
    for value in list(fixed.graph.input) + list(fixed.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = batch
    return fixed


class OrtCases:
    """onnxruntime sessions for one model file on one device ('cuda' or 'cpu')."""

    def __init__(self, path: Path, device: str, threads: int = 0) -> None:
        import onnx
        import onnxruntime as ort

        self.ort, self.device, self.threads = ort, device, threads
        self.model = onnx.load(str(path))
        self.providers: list[Any] = (
            [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"]
            if device == "cuda"
            else ["CPUExecutionProvider"]
        )
        self.session = self._session(self.model.SerializeToString(), self.providers)
        self.used = self.session.get_providers()

    def _session(self, model: bytes, providers: list[Any]) -> Any:
        from capsnet.service.engine import session_options  # the service's own options

        return self.ort.InferenceSession(model, session_options(self.threads), providers=providers)

    def plain(self, x: np.ndarray) -> Callable[[], Any]:
        return lambda: self.session.run(list(SERVED), {"image": x})

    def iobinding(self, x: np.ndarray) -> Callable[[], Any]:
        """Input copied into a device buffer bound once; outputs left on the device, the served ones
        copied back each run."""
        ov = self.ort.OrtValue.ortvalue_from_numpy(x, self.device, 0)
        io = self.session.io_binding()
        io.bind_ortvalue_input("image", ov)
        for out in self.session.get_outputs():
            io.bind_output(out.name, self.device)
        names = [o.name for o in self.session.get_outputs()]

        def run() -> list[np.ndarray]:
            ov.update_inplace(x)
            self.session.run_with_iobinding(io)
            outs = io.get_outputs()
            return [outs[names.index(n)].numpy() for n in SERVED]

        return run

    def cuda_graph(self, x: np.ndarray) -> Callable[[], Any]:
        """A session for this batch size alone with `enable_cuda_graph`: the first run records every
        kernel, later runs replay them; inputs and outputs live at fixed device addresses."""
        opts = {"cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": "1"}
        sess = self._session(
            static_batch(self.model, len(x)).SerializeToString(), [("CUDAExecutionProvider", opts)]
        )
        ov = self.ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        outs = {
            o.name: self.ort.OrtValue.ortvalue_from_shape_and_type(
                [len(x), *o.shape[1:]], np.float32, "cuda", 0
            )
            for o in sess.get_outputs()
        }
        io = sess.io_binding()
        io.bind_ortvalue_input("image", ov)
        for name, value in outs.items():
            io.bind_ortvalue_output(name, value)

        def run() -> list[np.ndarray]:
            ov.update_inplace(x)
            sess.run_with_iobinding(io)
            return [outs[n].numpy() for n in SERVED]

        return run


def _case(
    fn_factory: Callable[[], Callable[[], Any]], iters: int, batch: int, sync: Callable[[], None]
) -> dict[str, Any]:
    try:
        fn = fn_factory()
        return latency_stats(timed_calls(fn, iters, warmup=3, sync=sync), batch)
    except Exception as exc:  # a provider that cannot run a case is a result too
        return {"batch": batch, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def torch_model(model_dir: Path, device: str) -> Any:
    """The shipped weights in the PyTorch model (read back from the ONNX files, no checkpoint needed)."""
    import json as _json

    from capsnet.model_export.config import CapsNetConfig
    from capsnet.model_export.model import CapsNet
    from capsnet.model_export.train import weights_from_export

    weights, meta = weights_from_export(model_dir)
    model = CapsNet(CapsNetConfig.from_dict(_json.loads(meta["config"])))
    model.load_state_dict(weights, strict=True)
    return model.eval().to(device)


def run(
    model_dir: Path,
    *,
    device: str,
    batches: list[int],
    iters: int,
    threads: int,
    accuracy: bool,
    workdir: Path,
) -> dict[str, Any]:
    """The raw cases at each batch size, and with `accuracy` each precision's test accuracy; the fp16
    file is written to `workdir`."""
    import onnx
    import onnxruntime as ort
    import torch

    from capsnet.model_export.fp16 import to_fp16

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fp32 = OrtCases(model_dir / "capsnet.onnx", device, threads)
    half_path = workdir / "capsnet-fp16.onnx"
    onnx.save(to_fp16(fp32.model), str(half_path))
    fp16 = OrtCases(half_path, device, threads)
    model = torch_model(model_dir, device)
    halves: list[Any] = []

    def model_half() -> Any:
        if not halves:
            import copy

            halves.append(copy.deepcopy(model).half())
        return halves[0]

    result: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "providers_fp32": fp32.used,
            "providers_fp16": fp16.used,
        },
        "cases": {},
    }
    cases: dict[str, list[dict[str, Any]]] = result["cases"]
    rng = np.random.default_rng(0)
    for B in batches:
        x = rng.random((B, 1, 28, 28), dtype=np.float32)
        xt = torch.from_numpy(x)

        def eager(half: bool = False) -> Callable[[], Any]:
            m = model_half() if half else model

            def fn() -> Any:
                with torch.inference_mode():
                    inp = xt.to(device)
                    lengths, poses, *_ = m(inp.half() if half else inp)
                    return lengths.float().cpu(), poses.float().cpu()

            return fn

        n = max(iters, 3)
        todo: list[tuple[str, Callable[[], Callable[[], Any]]]] = [
            ("pytorch_eager", eager),
            ("ort_fp32", lambda: fp32.plain(x)),
            ("ort_fp32_iobinding", lambda: fp32.iobinding(x)),
            ("ort_fp16", lambda: fp16.plain(x)),
            ("ort_fp16_iobinding", lambda: fp16.iobinding(x)),
        ]
        if device == "cuda":
            todo += [
                ("pytorch_eager_fp16", lambda: eager(True)),
                ("ort_fp32_cuda_graph", lambda: fp32.cuda_graph(x)),
                ("ort_fp16_cuda_graph", lambda: fp16.cuda_graph(x)),
            ]
        for name, factory in todo:
            cases.setdefault(name, []).append(_case(factory, n, B, sync))
            print(name, cases[name][-1], flush=True)
    if accuracy:
        from capsnet.model_export.card import evaluate_onnx
        from capsnet.model_export.data import load_split

        images, labels = load_split("mnist", "test")
        result["accuracy"] = {
            "images": len(labels),
            "ort_fp32": float((evaluate_onnx(fp32.session, images) == labels).mean()),
            "ort_fp16": float((evaluate_onnx(fp16.session, images) == labels).mean()),
        }
        x = images[:500].astype(np.float32)[:, None] / 255.0
        a = fp32.session.run(list(SERVED), {"image": x})
        b = fp16.session.run(list(SERVED), {"image": x})
        result["accuracy"]["fp16_max_abs_diff"] = {
            n: float(np.abs(p - q).max()) for n, p, q in zip(SERVED, a, b, strict=True)
        }
        print("accuracy", result["accuracy"], flush=True)
    return result


def http(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`capsnet serve` on this device under closed-loop load (the asyncio client of bench.load: a GPU
    machine has cores to spare for it): batcher on (max batch 64) and off (max batch 1), one worker
    process, and batcher on with several workers (preprocessing is Python and holds the GIL)."""
    import asyncio
    import sys

    from bench.bench import free_port, start_server
    from bench.load import Client, stop_server, summarize

    rows = []
    for body_path in args.http_bodies:
        body = Path(body_path).read_bytes()
        for label, batch, workers in args.http_cases:
            port = free_port()
            env = {"CAPSNET_MAX_BATCH_SIZE": str(batch), "CAPSNET_MODEL_DIR": str(args.model_dir)}
            if args.device == "cuda":
                env["CAPSNET_REQUIRE_GPU"] = "1"
            cmd = [sys.executable, "-m", "capsnet", "serve", "--port", str(port), "--workers", str(workers)]
            try:
                proc = start_server(cmd, port, env)
            except RuntimeError as exc:  # e.g. CAPSNET_REQUIRE_GPU=1 and no usable CUDA provider
                rows.append({"case": label, "error": str(exc)[-500:]})
                print(rows[-1], flush=True)
                continue
            try:
                for c in args.concurrency:
                    client = Client("127.0.0.1", port, "/predict", body)
                    asyncio.run(client.closed_loop(c, 1.0))  # warm-up
                    client.results.clear()
                    asyncio.run(client.closed_loop(c, args.http_seconds))
                    s = summarize(client.results)
                    ok = s["status"].get("200", {})
                    row = {
                        "case": label,
                        "workers": workers,
                        "body": Path(body_path).name,
                        "concurrency": c,
                        "requests_per_s": ok.get("count", 0) / args.http_seconds,
                        "p50_ms": ok.get("p50_ms"),
                        "p99_ms": ok.get("p99_ms"),
                        "non_200": s["requests"] - ok.get("count", 0),
                    }
                    rows.append(row)
                    print(row, flush=True)
            finally:
                stop_server(proc)
    return rows


def print_table(r: dict[str, Any]) -> None:
    print(f"\n{r['machine']}")
    for name, rows in r["cases"].items():
        cells = [
            f"B={row['batch']}: "
            + (f"{row['p50_ms']:.2f} ms, {row['images_per_s']:.0f} img/s" if "p50_ms" in row else "error")
            for row in rows
        ]
        print(f"{name:22s} " + " | ".join(cells))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "capsnet-mnist")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--accuracy", action="store_true", help="also measure fp32/fp16 accuracy on the test set")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--http", action="store_true", help="also load `capsnet serve` over HTTP")
    p.add_argument("--http-bodies", nargs="+", default=[str(ROOT / "examples" / "7.png")])
    p.add_argument("--http-seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 64])
    p.add_argument("--http-workers", type=int, default=4, help="workers of the multi-process case")
    args = p.parse_args(argv)
    args.http_cases = http_cases(args.http_workers)
    result = run(
        args.model_dir,
        device=args.device,
        batches=args.batches,
        iters=args.iters,
        threads=args.threads,
        accuracy=args.accuracy,
        workdir=args.workdir,
    )
    _write(args.output, result)  # the raw figures survive a failure in the HTTP part
    if args.http:
        result["http"] = http(args)
        _write(args.output, result)
    print_table(result)


def _write(path: Path | None, result: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
