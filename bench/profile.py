"""Where onnxruntime spends inference time, per operator type: the profile behind the benchmark's
ratio of the full graph to the conv-only ceiling.

    python -m bench.profile [--model-dir models/capsnet-mnist] [--batch 32] [--runs 10]
                            [--file capsnet.onnx --file capsnet-int8.onnx] [--core-time]

Runs the exported graph with onnxruntime's profiler and prints each operator type's share of the
kernel time, with the nodes grouped as the convolutions (Conv1 + PrimaryCaps, what the ceiling graph
holds; in the int8 file with their Quantize/DequantizeLinear) and everything after them (squash,
routing, lengths). Several --file arguments are profiled one after the other and printed side by
side (fp32 against int8, or today's graph against a trial export). With --core-time it instead times
the files against each other at one intra-op thread, where onnxruntime runs on the calling thread, so
that thread's CPU time is the model's own cost and other processes on the cores move it little.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

CONV_OPS = {"Conv", "FusedConv", "NchwcConv", "Relu", "ReorderInput", "ReorderOutput"}
# The int8 file's convolutions: QLinearConv and the (de)quantization at their borders.
CONV_OPS |= {"QLinearConv", "QuantizeLinear", "DequantizeLinear"}


def profile(
    model_dir: Path, batch: int, runs: int, threads: int = 0, file: str = "capsnet.onnx"
) -> dict[str, Any]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "capsnet")
        sess = ort.InferenceSession(str(model_dir / file), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((batch, 1, 28, 28), dtype=np.float32)
        names = ["probabilities", "poses"]  # what /predict asks for
        for _ in range(runs + 1):  # the first run (allocations) is left out below
            sess.run(names, {"image": x})
        trace = json.loads(Path(sess.end_profiling()).read_text())
    runs_seen = [ev for ev in trace if ev.get("name") == "model_run"]
    first_end = runs_seen[0]["ts"] + runs_seen[0]["dur"] if runs_seen else 0
    trace = [ev for ev in trace if ev.get("ts", 0) >= first_end]
    by_op: dict[str, float] = defaultdict(float)
    for ev in trace:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            by_op[ev["args"]["op_name"]] += ev["dur"]
    total = sum(by_op.values())
    conv = sum(v for k, v in by_op.items() if k in CONV_OPS)
    return {
        "file": file,
        "batch": batch,
        "runs": runs,
        "kernel_ms_per_run": round(total / 1e3 / runs, 2),
        "conv_share": round(conv / total, 3),
        "after_conv_share": round(1 - conv / total, 3),
        "by_op": {k: round(v / total, 4) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
    }


def core_time(
    model_dir: Path, files: list[str], batches: tuple[int, ...] = (1, 32, 128), reps: int = 8
) -> dict[str, dict[int, float]]:
    """Images per second of the calling thread's CPU time (median), 1 intra-op thread, for each file
    at each batch size; the files are called in turn, so all see the same seconds of the machine."""
    import time

    import onnxruntime as ort

    from capsnet.service.engine import session_options

    sessions = {
        f: ort.InferenceSession(str(model_dir / f), session_options(1), providers=["CPUExecutionProvider"])
        for f in files
    }
    out: dict[str, dict[int, float]] = {f: {} for f in files}
    rng = np.random.default_rng(0)
    for B in batches:
        x = rng.random((B, 1, 28, 28), dtype=np.float32)
        samples: dict[str, list[float]] = {f: [] for f in files}
        for s in sessions.values():
            s.run(None, {"image": x})  # warm-up
        for _ in range(max(3, reps * 32 // B)):
            for f, s in sessions.items():
                t0 = time.thread_time()
                s.run(None, {"image": x})
                samples[f].append(time.thread_time() - t0)
        for f in files:
            out[f][B] = B / float(np.median(samples[f]))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", type=Path, default=Path("models/capsnet-mnist"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument(
        "--file", action="append", default=None, help="classifier file(s) in the model dir (capsnet.onnx)"
    )
    p.add_argument("--core-time", action="store_true", help="1-thread CPU time per image, files side by side")
    args = p.parse_args(argv)
    if args.core_time:
        files = args.file or ["capsnet.onnx"]
        rates = core_time(args.model_dir, files)
        print("images per second of CPU time, 1 intra-op thread (x the first file)")
        for B in rates[files[0]]:
            base = rates[files[0]][B]
            cells = "  ".join(f"{Path(f).name} {r[B]:7.1f} ({r[B] / base:.2f}x)" for f, r in rates.items())
            print(f"B = {B:<4} {cells}")
        return
    results = [profile(args.model_dir, args.batch, args.runs, file=f) for f in args.file or ["capsnet.onnx"]]
    print_side_by_side(results)


def print_side_by_side(results: list[dict[str, Any]]) -> None:
    """One column per profiled file: kernel time per run, the convolutions' share, each op's share."""
    w = max(18, *(len(Path(r["file"]).name) + 2 for r in results))
    print(f"B = {results[0]['batch']}, {results[0]['runs']} runs per file")
    print(f"{'':<26}" + "".join(f"{Path(r['file']).name:>{w}}" for r in results))
    print(f"{'kernel ms per run':<26}" + "".join(f"{r['kernel_ms_per_run']:>{w}.2f}" for r in results))
    for key, label in (("conv_share", "convolutions"), ("after_conv_share", "everything after them")):
        print(f"{label:<26}" + "".join(f"{r[key]:>{w}.1%}" for r in results))
    ops = sorted(
        {op for r in results for op in r["by_op"]},
        key=lambda op: -max(r["by_op"].get(op, 0) for r in results),
    )
    for op in ops:
        print(f"  {op:<24}" + "".join(f"{r['by_op'].get(op, 0.0):>{w}.1%}" for r in results))


if __name__ == "__main__":
    main()
