"""docs/performance.md and the README's precision table from bench/results/*.json: `python -m bench.report`
writes them, `--check` compares.

Every figure on that page comes from a results file; tests/test_docs.py fails when the page is not what
this writes, so a new or changed JSON without a regenerated page does not pass. Where a results file
does not say when, where and how it was measured, PROVENANCE does (newer runs may carry `measured`,
`machine_text` and `command` keys themselves, which win). A results file without a renderer below still
gets a section: its scalar figures as a table, until someone writes a renderer for it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.bench import http_row, references

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "performance.md"
README = ROOT / "README.md"

DIGIT28 = (
    'python -c "from PIL import Image; from model_export.data import load_split; '
    "Image.fromarray(load_split('mnist', 'test')[0][0]).save('digit28.png')\""
)

QUIET_VM = "a 2-core AMD EPYC (Zen 4, AVX-512 VNNI, no AMX) VM, no GPU, nothing else running"

PROVENANCE: dict[str, dict[str, str]] = {
    "cpu-2core.json": {
        "measured": "2026-12-01",
        "machine_text": QUIET_VM,
        "command": "capsnet bench --output bench/results/cpu-2core.json",
    },
    "cpu-2core-before-hotpath.json": {
        "measured": "2026-12-01, right after `cpu-2core.json`",
        "machine_text": QUIET_VM,
        "command": "git worktree add ../before 331dcf8 && git show d4ff82e:bench/bench.py > ../before/bench/bench.py\n"
        "cd ../before && capsnet bench --output bench/results/cpu-2core-before-hotpath.json",
        "note": "The service as it was before its request path was rebuilt (git 331dcf8: FastAPI routing and "
        "dependencies on every request, an executor future per batch, onnxruntime's threads spinning), "
        "measured by the same benchmark script as `cpu-2core.json`.",
    },
    "cpu-2core-routing-before.json": {
        "measured": "2026-12-01 at 9aa44cc, right before `cpu-2core-routing.json`",
        "machine_text": QUIET_VM,
        "command": "mkdir before && for f in capsnet.onnx capsnet-int8.onnx decoder.onnx export.json "
        "model_card.json MODEL_CARD.md; do git show fd494a4:models/capsnet-mnist/$f > before/$f; done\n"
        "capsnet bench --model-dir before --output bench/results/cpu-2core-routing-before.json",
        "note": "The model files as shipped before the routing was exported without the votes (the graph that "
        "formed û), served and measured by the current code.",
    },
    "cpu-2core-routing.json": {
        "measured": "2026-12-01 at 9aa44cc",
        "machine_text": QUIET_VM,
        "command": "capsnet bench --output bench/results/cpu-2core-routing.json",
        "note": "The files shipped from 9aa44cc to 86e7c1c: routing exported without the votes û at every batch size "
        "(`model_export/capsules.py`, `route_without_votes`).",
    },
    "cpu-2core-now.json": {
        "measured": "2026-12-01 at 86e7c1c, on a fresh clone",
        "machine_text": QUIET_VM,
        "command": "capsnet bench --output bench/results/cpu-2core-now.json",
        "note": "The files and code of 86e7c1c: both routings in one graph behind an If on the batch size "
        "(the votes formed up to 4 images, without them above; one static graph since issue #34), one "
        "write per answer, and the batcher's mean batch per HTTP row (`images per batch`). The VM ran slow "
        "this session (raw onnxruntime B = 1: 3.4 ms here, 2.8 ms in the 05e665c run of the same page); an "
        "alternating A/B of the model files before and after the If is in the commit (86e7c1c).",
    },
    "cpu-2core-avx2.json": {
        "measured": "2026-12-06 at baa325e (the files of #32 and #34: one static graph, int8 with 7-bit weights)",
        "machine_text": "a 2-core AMD EPYC VM with AVX2 and no AVX-512, so no VNNI, no GPU, nothing else "
        "running (the background training paused)",
        "command": "capsnet bench --output bench/results/cpu-2core-avx2.json",
        "note": "The first run on a CPU without VNNI, where onnxruntime's int8 kernels sum pairs of products "
        "in 16 bits (vpmaddubsw): the int8 rows show what int8 is worth on such a host. Its figures are not "
        "comparable with the AVX-512 runs': another CPU, and other model files.",
    },
    "preprocess-2core.json": {
        "measured": "2026-12-01 at 1bf9ba9",
        "machine_text": "a 2-core AMD EPYC (Zen 4) VM shared with other jobs (load average in the JSON)",
        "command": "python -m bench.preprocess --output bench/results/preprocess-2core.json",
    },
    "gpu-h200.json": {
        "measured": "2026-11-27",
        "machine_text": "one NVIDIA H200 (driver 580.159.04) with 16 CPU cores",
        "command": f"{DIGIT28}\n"
        "python -m bench.gpu --accuracy --http --http-bodies digit28.png examples/7.png "
        "--output bench/results/gpu-h200.json",
        "note": "`digit28.png` is a 28×28 MNIST test digit as a PNG; the first line writes the test set's first "
        "digit, which digit the stored run used is not recorded. Measured with the model files of then, whose "
        "graph formed the votes û; the graph exported since (routing without the votes, one static graph "
        "with no control flow) has not run on a GPU yet.",
    },
    "load-2core-300s.json": {
        "measured": "2026-12-01 at d4fc9df",
        "machine_text": "a 2-core AMD EPYC (Zen 4) VM, no GPU, nothing else running",
        "note": "The files and code of d4fc9df (the shipped graph's If on the batch size, one write per answer). "
        "The VM ran in a slow phase (raw onnxruntime B = 1 at 3.5 ms in a `capsnet bench` just before): the "
        "928d03c run of this page answered 247.5 requests/s.",
        "command": "capsnet load --seconds 300 --output bench/results/load-2core-300s.json",
    },
}


def _f(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def _i(x: float) -> str:
    return f"{x:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _provenance(name: str, data: dict[str, Any], versions: str) -> list[str]:
    p = {
        **PROVENANCE.get(name, {}),
        **{k: data[k] for k in ("measured", "machine_text", "command") if k in data},
    }
    lines = [
        f"How it was measured: {p.get('measured', 'date not recorded')}, on "
        f"{p.get('machine_text', 'a machine not recorded')}{versions}; results in `bench/results/{name}`."
    ]
    if "command" in p:
        lines += ["", "```bash", p["command"], "```"]
    if "note" in p:
        lines += ["", p["note"]]
    return lines


CPU_TITLES = {
    "cpu-2core-now.json": "CPU now: raw inference, the service, the baseline",
    "cpu-2core-avx2.json": "CPU without VNNI (AVX2 alone): raw inference, the service, the baseline",
    "cpu-2core-routing.json": "CPU, the first run of the routing without the votes",
    "cpu-2core.json": "CPU: raw inference, the service, the baseline, with the graph that formed û",
    "cpu-2core-before-hotpath.json": "CPU, the service before its request path was rebuilt",
}


def cpu(name: str, d: dict[str, Any]) -> list[str]:
    m = d["machine"]
    out = [f"## {CPU_TITLES.get(name, f'CPU: `{name}`')}", ""]
    out += _provenance(
        name, d, f" (Python {m['python']}, onnxruntime {m['onnxruntime']}, torch {m['torch']})"
    )
    if "vector_extensions" in m:  # which rows apply to a reader's host: int8 depends on VNNI
        ext = m["vector_extensions"]
        out += [
            "",
            f"CPU features: {', '.join(ext['present']) or 'none read'}; int8 kernels: {ext['int8_kernels']}.",
        ]
    out += [
        "",
        "One run of `capsnet bench` measures PyTorch eager against onnxruntime; a conv-only ceiling (Conv1 +",
        "PrimaryCaps alone as an ONNX graph: the work no routing code can avoid); the service over HTTP with",
        "the batcher on (`CAPSNET_MAX_BATCH_SIZE=64`, `CAPSNET_MAX_WAIT_MS=2`) and off (batch size 1), loaded",
        "by `wrk` POSTing a 28×28 MNIST PNG with `?preprocess=none`; and the endpoint users would otherwise",
        "write, a plain FastAPI endpoint running the PyTorch CapsNet per request (`bench/baseline_app.py`).",
        "Raw onnxruntime runs in two forms: one session on all cores, and one batch per core side by side",
        "(one-thread sessions), which the service does under load (`CAPSNET_PARALLEL_BATCHES`). The ratios",
        "take the first at its best batch; `overhead_ms_per_request` takes onnxruntime's core time per image",
        "at its cheapest in either form. Runs since 2026-12-01 measure these references (and the ceiling) a",
        "second time after the HTTP cases (`raw_again` in the JSON) and each ratio takes the stricter pass, so",
        "a reference slowed by other work in one pass cannot flatter the service.",
        "On this VM repeated runs move single figures by up to ±30 %: compare within one run.",
        "",
    ]
    names = {
        "onnxruntime": "onnxruntime (CPU EP)",
        "onnxruntime_side_by_side": "onnxruntime, one batch per core side by side (one-thread session)",
        "conv_only_ceiling": "conv-only ceiling (Conv1 + PrimaryCaps in ORT)",
        "pytorch_eager": "PyTorch eager",
    }
    names["onnxruntime_int8"] = "onnxruntime (CPU EP), `capsnet-int8.onnx`"
    rows = [
        [names.get(k, k), str(r["batch"]), _f(r["p50_ms"]), _i(r["images_per_s"]),
         _f(r["core_ms_per_image"], 2) if "core_ms_per_image" in r else "—"]
        for k, cases in d["raw"].items()
        for r in cases
    ]  # fmt: skip
    header = ["raw inference (no HTTP)", "B", "p50 ms", "images/s", "core ms per image"]
    out += [*_table(header, rows), ""]
    rows = [
        [
            r["case"],
            str(r["connections"]),
            _i(r["requests_per_s"]),
            _f(r["p50_ms"]),
            _f(r["p99_ms"]),
            _f(r["server_cpu_cores"], 2),
            _f(r["server_core_ms_per_request"], 2) if "server_core_ms_per_request" in r else "—",
            _f(r["event_loop_core_ms_per_request"], 2) if "event_loop_core_ms_per_request" in r else "—",
            _f(r["mean_batch"], 1) if "mean_batch" in r else "—",
            _i(r["server_rss_mb"]),
        ]
        for r in d["http"]
    ]
    header = [
        "HTTP `POST /predict`",
        "concurrency",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "server CPU (cores)",
        "core ms per request",
        "of it, the event loop's",
        "images per batch",
        "RSS MB",
    ]
    out += [*_table(header, rows), ""]
    if "grpc" in d:
        g = d["grpc"]
        header = ["gRPC `ModelInfer` (tritonclient.grpc)", "B", "streams", "images/s", "p50 ms",
                  "onnxruntime B = 64, images/s"]  # fmt: skip
        row = ["raw tensors", str(g["batch"]), str(g["streams"]), _i(g["images_per_s"]), _f(g["p50_ms"]),
               _i(g["onnxruntime_b64"]["images_per_s"])]  # fmt: skip
        out += [*_table(header, [row]), ""]
    if "ratios" in d:
        out += ["| ratio | target | measured | met |", "|---|---|---|---|"]
        out += [
            f"| `{k}` | {r['target']} | {_f(r['value'], 2)} | {'yes' if r['met'] else 'no'} |"
            for k, r in d["ratios"].items()
        ]
        out += ["", "What each ratio is made of, from figures of the same run:", ""]
        out += [f"- `{k}`: {r['why']}" for k, r in d["ratios"].items()]
        out += [""]
    if "profile" in d:
        prof = d["profile"]
        ops = ", ".join(f"{op} {v:.1%}" for op, v in list(prof["by_op"].items())[:6])
        out += [
            f"Where onnxruntime's kernel time goes at B = {prof['batch']} (`python -m bench.profile --batch "
            f"{prof['batch']}`, {prof['runs']} runs, {_f(prof['kernel_ms_per_run'])} ms per run): {ops}.",
            "",
        ]
    return out


GPU_CASES = {
    "pytorch_eager": "PyTorch eager, fp32",
    "pytorch_eager_fp16": "PyTorch eager, fp16",
    "ort_fp32": "onnxruntime CUDA, fp32",
    "ort_fp32_iobinding": "onnxruntime CUDA, fp32, IOBinding",
    "ort_fp32_cuda_graph": "onnxruntime CUDA, fp32, CUDA graph",
    "ort_fp16": "onnxruntime CUDA, fp16 variant",
    "ort_fp16_iobinding": "onnxruntime CUDA, fp16 variant, IOBinding",
    "ort_fp16_cuda_graph": "onnxruntime CUDA, fp16 variant, CUDA graph",
}


def gpu(name: str, d: dict[str, Any]) -> list[str]:
    m = d["machine"]
    out = [f"## GPU: {m['device']}", ""]
    out += _provenance(
        name, d, f" (Python {m['python']}, torch {m['torch']}, onnxruntime-gpu {m['onnxruntime']})"
    )
    out += [
        "",
        "`bench.gpu` measures PyTorch eager against onnxruntime's CUDA provider plainly (numpy in and out),",
        "with IOBinding and with CUDA graphs (one session per fixed batch size), each in fp32 and in the fp16",
        "variant (`model_export/fp16.py`); every case copies the input from host memory and the two outputs",
        "`/predict` needs back to it.",
        "",
    ]
    batches = sorted({r["batch"] for cases in d["cases"].values() for r in cases})
    rows = []
    for key, label in GPU_CASES.items():
        if key not in d["cases"]:
            continue
        by_batch = {r["batch"]: r for r in d["cases"][key]}
        rows.append(
            [label]
            + [
                f"{_f(by_batch[b]['p50_ms'], 2)} ({_i(by_batch[b]['images_per_s'])})"
                if b in by_batch
                else "–"
                for b in batches
            ]
        )
    out += [*_table(["raw inference, p50 ms (images/s)"] + [f"B = {b}" for b in batches], rows), ""]
    if "accuracy" in d:
        a = d["accuracy"]
        diff = a["fp16_max_abs_diff"]["probabilities"]
        out += [
            f"Test accuracy through onnxruntime CUDA on {_i(a['images'])} MNIST test images: "
            f"{a['ort_fp32']:.2%} in fp32, {a['ort_fp16']:.2%} in fp16 (largest difference of a capsule "
            f"length between the two: {diff:.1e}).",
            "",
        ]
    if "http" in d:
        bodies = {"digit28.png": "28×28 PNG", "7.png": "227×224 scan (`examples/7.png`)"}
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in d["http"]:
            groups.setdefault((r["body"], r["case"]), []).append(r)
        rows = []
        for (body, case), rs in groups.items():
            workers = rs[0]["workers"]
            what = f"{bodies.get(body, body)}, {workers} worker{'s' if workers > 1 else ''}, " + (
                "batcher off" if "off" in case else "batcher on"
            )
            rows.append(
                [
                    what,
                    " / ".join(str(r["concurrency"]) for r in rs),
                    " / ".join(_i(r["requests_per_s"]) for r in rs),
                    " / ".join(_f(r["p50_ms"]) for r in rs),
                    " / ".join(_f(r["p99_ms"]) for r in rs),
                    str(sum(r["non_200"] for r in rs)),
                ]
            )
        header = [
            "the service on that machine, `POST /predict`",
            "concurrency",
            "requests/s",
            "p50 ms",
            "p99 ms",
            "non-200",
        ]
        out += [
            "The service on the same machine (`capsnet serve`, loaded by the asyncio client of `bench/load.py`,",
            "5 s per row after 1 s of warm-up):",
            "",
        ]
        out += [*_table(header, rows), ""]
    out += _gpu_reading(d)
    return out


def _best(rows: list[dict[str, Any]], key: str = "requests_per_s") -> float:
    return max(r[key] for r in rows)


def _gpu_reading(d: dict[str, Any]) -> list[str]:
    """What the GPU tables say, as ratios computed from them."""
    c = {k: {r["batch"]: r for r in v} for k, v in d["cases"].items()}
    out = ["What these say:", ""]
    if {"ort_fp32", "ort_fp16_cuda_graph"} <= set(c) and 1 in c["ort_fp32"]:
        b1 = c["ort_fp32"][1]["p50_ms"] / c["ort_fp16_cuda_graph"][1]["p50_ms"]
        out.append(
            f"- At B = 1 the GPU waits on kernel launches: a CUDA graph replays the whole unrolled routing as one "
            f"launch, {_f(c['ort_fp16_cuda_graph'][1]['p50_ms'], 2)} ms in fp16, {b1:.1f}× faster than the plain "
            "fp32 session. CUDA graphs are measured here but not used by the service."
        )
    big = max(c.get("ort_fp32", {}) or [0])
    if big and "ort_fp16" in c and big in c["ort_fp16"]:
        gain = c["ort_fp16"][big]["images_per_s"] / c["ort_fp32"][big]["images_per_s"]
        out.append(
            f"- At B = {big} the fp16 variant gives {gain:.2f}× the fp32 throughput of onnxruntime "
            "(`CAPSNET_PRECISION=fp16`)."
        )
    if "http" in d:
        rows = [r for r in d["http"] if r["body"] == d["http"][0]["body"]]
        one = _best([r for r in rows if r["workers"] == 1])
        many = [r for r in rows if r["workers"] > 1]
        if many:
            gpu_best = max(r["images_per_s"] for v in d["cases"].values() for r in v)
            out.append(
                f"- The service is CPU-bound, not GPU-bound: one worker answers at most {_i(one)} requests/s "
                f"while the GPU classifies up to {_i(gpu_best)} images/s; {many[0]['workers']} workers answer "
                f"{_i(_best(many))} ({_best(many) / one:.1f}×). On a GPU host set `CAPSNET_WORKERS` to the "
                "cores you can give it; every worker holds its own CUDA session."
            )
    return [*out, ""] if len(out) > 2 else []


def load(name: str, d: dict[str, Any]) -> list[str]:
    out = ["## Load, overload and shutdown (2 cores)", ""]
    out += _provenance(name, d, "")
    out += [
        "",
        "The body is `examples/7.png`, a 227×224 scan, so every request pays the full photo preprocessing.",
        "What the scenarios are is in [reliability.md](reliability.md).",
        "",
    ]
    s, o, g = d["sustained_load"], d["overload"], d["graceful_shutdown"]
    ok, no = o["flood"]["status"]["200"], o["flood"]["status"]["503"]
    rec = o["recovery"]["status"].get("200", {"count": 0, "p99_ms": 0.0})
    before = g["before_sigterm"]["status"]
    rows = [
        [
            f"sustained load, wrk, concurrency {s['concurrency']}, {s['seconds']:.0f} s",
            f"{_f(s['requests_per_s'])} req/s, p50 {_i(s['p50_ms'])} ms, p99 {_i(s['p99_ms'])} ms, "
            f"{s['non_2xx']} non-2xx, {s['socket_errors'] or 'no'} socket errors; RSS {_f(s['rss_after_warmup_mb'])} MB "
            f"after warm-up, at most {_f(s['rss_max_mb'])} MB ({s['rss_growth']:+.1%}), {_f(s['rss_end_mb'])} MB at the end",
        ],
        [
            f"overload, `CAPSNET_QUEUE_SIZE={o['queue_size']}`, `CAPSNET_MAX_IN_FLIGHT={o['max_in_flight']}`: "
            f"capacity {_f(o['capacity_req_per_s'])} req/s, offered {_f(o['offered_req_per_s'])} req/s open-loop "
            f"for {o['seconds']:.0f} s",
            f"{_i(ok['count'])} × 200 (p50 {_i(ok['p50_ms'])} ms, p99 {_i(ok['p99_ms'])} ms), {_i(no['count'])} × 503, "
            f"{_i(o['rejected_with_retry_after'])} of them with `Retry-After` (p50 {_i(no['p50_ms'])} ms, p99 "
            f"{_i(no['p99_ms'])} ms); right after, {rec['count']} of {o['recovery']['requests']} requests 200 "
            f"(p99 {_i(rec['p99_ms'])} ms)",
        ],
        [
            f"SIGTERM during load, {g['in_flight_at_sigterm']} requests in flight",
            f"{g['in_flight_answered_200']} of {g['in_flight_at_sigterm']} answered 200 "
            f"({sum(v['count'] for v in before.values())} requests before the signal); of "
            f"{g['after_sigterm_0_25_s']['requests']} tries from 0.25 s after it on, "
            f"{g['after_sigterm_0_25_s']['status'].get('0', {'count': 0})['count']} got no answer (connection "
            "closed or refused before any byte); a new connection 0.5 s later "
            f"{'accepted' if g['new_connection_accepted_after_0_5_s'] else 'refused'}; exit "
            f"{_f(g['exit_after_sigterm_s'], 2)} s after the signal, clean shutdown "
            f"{'logged' if g['clean_shutdown_logged'] else 'not logged'}",
        ],
    ]
    return out + _table(["scenario", "figures"], rows) + [""]


def _scalars(x: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _scalars(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _scalars(v, f"{prefix}[{i}]")
    elif isinstance(x, (int, float, str, bool)) or x is None:
        yield prefix, x


def generic(name: str, d: dict[str, Any]) -> list[str]:
    out = [f"## `{name}`", "", *_provenance(name, d, ""), ""]
    rows = [[f"`{k}`", f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in _scalars(d)]
    return out + _table(["figure", "value"], rows) + [""]


def preprocess(name: str, d: dict[str, Any]) -> list[str]:
    out = [
        "## Photo preprocessing (`preprocess_bytes`), before and after OpenCV",
        "",
        *_provenance(name, d, ""),
        "",
    ]
    out += [
        f"Median per image; before = git {d['baseline']} (Pillow and numpy), after = Pillow for decoding, "
        "OpenCV for the image analysis; both in one run, in turns.",
        "",
    ]
    targets = d.get("targets", {})
    rows = [
        [c["what"], _f(c["before_ms"], 3), _f(c["after_ms"], 3), f"{c['speedup']:.1f}×", _target(targets.get(key))]
        for key, c in d["cases"].items()
    ]  # fmt: skip
    return out + _table(["image", "before ms", "after ms", "speed-up", "target ms"], rows) + [""]


def _target(t: dict[str, Any] | None) -> str:
    return "—" if t is None else f"≤ {t['target_ms']:g}: {'met' if t['met'] else 'not met'}"


def before_after(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The request path before and after, from two runs of one benchmark script on one machine."""

    def row(d: dict[str, Any], c: int) -> dict[str, Any]:
        return http_row(d, "service, batcher on", c)

    figures = [
        ("requests/s at concurrency 32", lambda d: _i(row(d, 32)["requests_per_s"])),
        ("of raw onnxruntime at its best batch", lambda d: _f(d["ratios"]["service_c32_vs_ort_best"]["value"], 3)),
        ("server core ms per request beyond onnxruntime's per image (`overhead_ms_per_request`)",
         lambda d: _f(d["ratios"]["overhead_ms_per_request"]["value"], 2)),
        ("the event loop's core ms per request at concurrency 32",
         lambda d: _f(row(d, 32)["event_loop_core_ms_per_request"], 2)),
        ("p50 at concurrency 1, ms", lambda d: _f(row(d, 1)["p50_ms"], 2)),
        ("p50 at concurrency 1 minus onnxruntime B = 1, ms",
         lambda d: _f(d["ratios"]["service_c1_p50_minus_ort_b1_ms"]["value"], 2)),
    ]  # fmt: skip
    out = ["## The request path, before and after", "",
           "`cpu-2core-before-hotpath.json` and `cpu-2core.json` side by side (same machine, same benchmark "
           "script, one run after the other; 28×28 PNG, `?preprocess=none`):", ""]  # fmt: skip
    return out + _table(["figure", "before", "after"], [[n, f(before), f(after)] for n, f in figures]) + [""]


def routing_before_after(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The exported routing with and without the votes û, from two runs of one benchmark on one machine.
    Each raw figure is taken from both reference passes, as the benchmark's ratios take it."""

    def b1(d: dict[str, Any], case: str) -> str:
        return _f(min(r["p50_ms"] for r in references(d, case) if r["batch"] == 1), 2)

    def best(case: str) -> Callable[[dict[str, Any]], str]:
        def cell(d: dict[str, Any]) -> str:
            row = max(references(d, case), key=lambda r: r["images_per_s"])
            return f"{_i(row['images_per_s'])} (B = {row['batch']})"

        return cell

    on, int8 = "service, batcher on", "service int8, batcher on"
    figures = [
        ("raw fp32 onnxruntime, images/s at its best batch", best("onnxruntime")),
        ("of the conv-only ceiling (`ort_best_vs_conv_ceiling`, target ≥ 0.85)",
         lambda d: _f(d["ratios"]["ort_best_vs_conv_ceiling"]["value"], 3)),
        ("raw fp32 B = 1, p50 ms", lambda d: b1(d, "onnxruntime")),
        ("raw int8 onnxruntime, images/s at its best batch", best("onnxruntime_int8")),
        ("int8 against fp32 at their best batches", lambda d: _f(d["ratios"]["int8_best_vs_fp32_best"]["value"], 2)),
        ("raw int8 B = 1, p50 ms", lambda d: b1(d, "onnxruntime_int8")),
        ("service fp32, requests/s at concurrency 32", lambda d: _i(http_row(d, on, 32)["requests_per_s"])),
        ("service fp32, p50 ms at concurrency 1", lambda d: _f(http_row(d, on, 1)["p50_ms"], 2)),
        ("service int8, requests/s at concurrency 32", lambda d: _i(http_row(d, int8, 32)["requests_per_s"])),
        ("service int8, requests/s at concurrency 64", lambda d: _i(http_row(d, int8, 64)["requests_per_s"])),
        ("service int8, p50 ms at concurrency 1", lambda d: _f(http_row(d, int8, 1)["p50_ms"], 2)),
    ]  # fmt: skip
    out = ["## The routing without the votes, before and after", "",
           "`cpu-2core-routing-before.json` (the model files that formed û) and `cpu-2core-routing.json` "
           "(the files without the votes, shipped until 86e7c1c) side by side: same machine, same code, one run after the other. Raw onnxruntime is "
           "faster from B = 8 up and slower at B = 1, where W is read five times instead of û once; the "
           "service at concurrency 32 forms batches of about 7, where the two graphs differ little. A single "
           "run's concurrency-1 figures move by more than the graphs' difference at B = 1 (up to ±30 % run to "
           "run on this VM): read the raw B = 1 rows for that. From 86e7c1c until issue #34 the shipped file held both "
           "routings behind an If on the batch size, the votes formed up to 4 images; it routes without the votes at "
           "every batch size again, one static graph ([training.md](training.md)).", ""]  # fmt: skip
    return out + _table(["figure", "before", "after"], [[n, f(before), f(after)] for n, f in figures]) + [""]


RENDERERS: dict[str, Callable[[str, dict[str, Any]], list[str]]] = {
    "cpu-2core-now.json": cpu,
    "cpu-2core-avx2.json": cpu,
    "cpu-2core-routing.json": cpu,
    "cpu-2core-routing-before.json": lambda name, d: [],  # its figures are in the before/after table
    "cpu-2core.json": cpu,
    "cpu-2core-before-hotpath.json": cpu,
    "gpu-h200.json": gpu,
    "load-2core-300s.json": load,
    "preprocess-2core.json": preprocess,
}

# Which precision where. The rows say what the results files show; a new precision adds its row. The
# same table stands in docs/performance.md and in the README, between these two markers.
TABLE_START = "<!-- precision table: one row per CAPSNET_PRECISION value, from bench/results -->"
TABLE_END = "<!-- end precision table -->"
PRECISION = [
    TABLE_START,
    "| `CAPSNET_PRECISION` | file | where | why |",
    "|---|---|---|---|",
    "| `fp32` (default) | `capsnet.onnx` | CPU, and GPU when in doubt | the shipped file; the reference accuracy |",
    "| `fp16` | `capsnet-fp16.onnx` (`capsnet fp16 MODEL_DIR`) | GPU | faster on the H200 at every batch size "
    "of `gpu-h200.json`, the same test accuracy; the CPU gains nothing from it |",
]


def int8_row(
    name: str, cpu_run: dict[str, Any], card: dict[str, Any], plain: tuple[str, dict[str, Any]] | None
) -> str:
    r = cpu_run["ratios"]
    q = card["int8"]
    elsewhere = (
        f"; on a CPU without VNNI {_f(plain[1]['ratios']['int8_best_vs_fp32_best']['value'], 2)}× (`{plain[0]}`), "
        "and the service warns so"
        if plain
        else ""
    )
    return (
        "| `int8` | `capsnet-int8.onnx` (shipped; `capsnet quantize MODEL_DIR`) | CPU-only hosts, where it pays: "
        f"AVX-512 VNNI, AVX-VNNI or AMX | {_f(r['int8_best_vs_fp32_best']['value'], 2)}× raw fp32's images/s at the "
        f"best batch and {_f(r['service_int8_c32_vs_baseline_c32']['value'], 1)}× the PyTorch baseline through the "
        f"service (`{name}`){elsewhere}; {q['test_accuracy']:.2%} test accuracy against fp32's "
        f"{q['fp32_test_accuracy']:.2%} (model card), the same answers on every x86 CPU (7-bit weights: within "
        f"{q['near_ties']['images']} test images) |"
    )


# The run of today's shipped files first: the precision table reads the first of these that has int8 figures.
CURRENT_CPU_RUNS = ("cpu-2core-now.json", "cpu-2core-routing.json", "cpu-2core.json")
NO_VNNI_RUNS = ("cpu-2core-avx2.json",)  # the same on a CPU whose int8 kernels lack VNNI


def precision_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = list(PRECISION)
    card = json.loads((ROOT / "models" / "capsnet-mnist" / "model_card.json").read_text())
    with_int8 = [n for n in CURRENT_CPU_RUNS if "int8_best_vs_fp32_best" in runs.get(n, {}).get("ratios", {})]
    if "int8" in card and with_int8:
        plain = next(
            (
                (n, runs[n])
                for n in NO_VNNI_RUNS
                if "int8_best_vs_fp32_best" in runs.get(n, {}).get("ratios", {})
            ),
            None,
        )
        lines += [int8_row(with_int8[0], runs[with_int8[0]], card, plain)]
    return [*lines, TABLE_END]


def _runs(results: Path) -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(results.glob("*.json"))}


def render(results: Path = RESULTS) -> str:
    lines = [
        "# Performance",
        "",
        "<!-- Generated by `python -m bench.report` from bench/results/*.json; do not edit by hand. -->",
        "Every figure on this page is read from a results file in `bench/results/` by `bench/report.py`;",
        "each section says when, on what machine and with which command it was measured. Figures from",
        "different machines or runs are not comparable with each other.",
        "",
    ]
    runs = _runs(results)
    if {"cpu-2core-routing.json", "cpu-2core-routing-before.json"} <= set(runs):
        lines += routing_before_after(runs["cpu-2core-routing-before.json"], runs["cpu-2core-routing.json"])
    if {"cpu-2core.json", "cpu-2core-before-hotpath.json"} <= set(runs):
        lines += before_after(runs["cpu-2core-before-hotpath.json"], runs["cpu-2core.json"])
    for name, data in sorted(runs.items(), key=lambda kv: (kv[0] != CURRENT_CPU_RUNS[0], kv[0])):
        lines += RENDERERS.get(name, generic)(name, data)
    lines += ["## Which precision where", "", *precision_table(runs), ""]
    return "\n".join(lines).rstrip() + "\n"


def readme_with_table(readme: str, results: Path = RESULTS) -> str:
    """`readme` with its precision table (between TABLE_START and TABLE_END) as the results say."""
    head, rest = readme.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    return head + "\n".join(precision_table(_runs(results))) + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=PAGE)
    p.add_argument("--readme", type=Path, default=README, help="the README whose precision table to write")
    p.add_argument("--check", action="store_true", help="exit 1 when a file differs instead of writing it")
    args = p.parse_args(argv)
    texts = {args.output: render(), args.readme: readme_with_table(args.readme.read_text())}
    if args.check:
        stale = [path for path, text in texts.items() if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"{path} is not what `python -m bench.report` writes; run it", file=sys.stderr)
        return 1 if stale else 0
    for path, text in texts.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
