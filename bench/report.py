"""docs/performance.md and the README's precision table from bench/results/*.json: `python -m bench.report`
writes them, `--check` compares.

Every figure on that page comes from a results file; tests/test_docs.py fails when the page is not what
this writes, so a new or changed JSON without a regenerated page does not pass. The prose is the Markdown
of bench/templates/performance.md, filled here; where a results file does not say when, where and how it
was measured, its provenance block there does (newer runs may carry `measured`, `machine_text` and
`command` keys themselves, which win). A results file without a renderer below still gets a section: its
scalar figures as a table, until someone writes a renderer for it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from string import Template
from typing import Any

from bench.bench import FORM_NONE, form_split, http_row, references

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "performance.md"
README = ROOT / "README.md"
TEMPLATE = Path(__file__).resolve().parent / "templates" / "performance.md"


@cache
def _blocks() -> dict[str, str]:
    """The template's blocks by marker: "template: NAME" and "provenance: FILE"."""
    parts = re.split(r"^<!-- (template|provenance): (\S+) -->\n", TEMPLATE.read_text(), flags=re.M)
    triples = zip(parts[1::3], parts[2::3], parts[3::3], strict=True)
    return {f"{kind}:{name}": text.strip("\n") for kind, name, text in triples}


def _fill(block: str, **values: Any) -> list[str]:
    return Template(_blocks()[f"template:{block}"]).substitute(values).split("\n")


def provenance(name: str) -> dict[str, str]:
    """A results file's provenance block: title, measured, machine_text, command and note."""
    lines = _blocks().get(f"provenance:{name}", "").split("\n")
    p: dict[str, str] = {}
    while lines and (m := re.match(r"(title|measured|machine): (.*)", lines[0])):
        p["machine_text" if m[1] == "machine" else m[1]] = m[2]
        lines.pop(0)
    rest = "\n".join(lines).strip("\n")
    if rest.startswith("```bash\n"):
        p["command"], rest = rest.removeprefix("```bash\n").split("\n```", 1)
        rest = rest.strip("\n")
    if rest:
        p["note"] = rest
    return p


def _f(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def _i(x: float) -> str:
    return f"{x:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _provenance(name: str, data: dict[str, Any], versions: str) -> str:
    p = {**provenance(name), **{k: data[k] for k in ("measured", "machine_text", "command") if k in data}}
    lines = _fill(
        "measured",
        measured=p.get("measured", "date not recorded"),
        machine=p.get("machine_text", "a machine not recorded"),
        versions=versions,
        name=name,
    )
    if "command" in p:
        lines += ["", "```bash", p["command"], "```"]
    if "note" in p:
        lines += ["", p["note"]]
    return "\n".join(lines)


def cpu(name: str, d: dict[str, Any]) -> list[str]:
    m = d["machine"]
    versions = f" (Python {m['python']}, onnxruntime {m['onnxruntime']}, torch {m['torch']})"
    title = provenance(name).get("title", f"CPU: `{name}`")
    out = _fill("cpu", title=title, provenance=_provenance(name, d, versions))
    if "vector_extensions" in m:  # which rows apply to a reader's host: int8 depends on VNNI
        ext = m["vector_extensions"]
        out += ["", *_fill("cpu_features", present=", ".join(ext["present"]) or "none read",
                           kernels=ext["int8_kernels"])]  # fmt: skip
    out += ["", *_fill("cpu_method"), ""]
    names = {
        "onnxruntime": "onnxruntime (CPU EP)",
        "onnxruntime_side_by_side": "onnxruntime, one batch per core side by side (one-thread session)",
        "conv_only_ceiling": "conv-only ceiling (Conv1 + PrimaryCaps in ORT)",
        "pytorch_eager": "PyTorch eager",
        "onnxruntime_int8": "onnxruntime (CPU EP), `capsnet-int8.onnx`",
    }
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
    if any("own_cost_ms" in r for r in d["http"]):
        prose = _fill("cpu_forms")
        if any("in_process_ms" in r for r in d["http"]):  # (result files before 2026-12-08 lack it)
            prose += ["", *_fill("cpu_forms_in_process")]
        out += [*prose, "", *forms_table(d), ""]
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
        out += ["", *_fill("cpu_ratios"), ""]
        out += [f"- `{k}`: {r['why']}" for k, r in d["ratios"].items()]
        out += [""]
    if "profile" in d:
        prof = d["profile"]
        ops = ", ".join(f"{op} {v:.1%}" for op, v in list(prof["by_op"].items())[:6])
        out += [
            *_fill(
                "cpu_profile",
                batch=prof["batch"],
                runs=prof["runs"],
                ms=_f(prof["kernel_ms_per_run"]),
                ops=ops,
            ),
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


def forms_table(d: dict[str, Any]) -> list[str]:
    """The input forms' table: what each costs beyond a PNG taken as it is, split into its parts."""
    forms = [r for r in d["http"] if "own_cost_ms" in r and r["case"] != FORM_NONE]
    in_process = any("in_process_ms" in r for r in forms)  # (result files before 2026-12-08 lack it)
    rows = []
    for r in forms:
        sp = form_split(d, r["case"], r["connections"])
        rows.append([r["case"], str(r["connections"]), _f(sp["own_work_ms"], 2),
                     _f(sp["own_work_after_inference_ms"], 2), _f(sp["beyond_none_core_ms"], 2),
                     _f(sp["loop_beyond_none_ms"], 2), _f(sp["hand_offs_ms"], 2), _f(sp["p50_beyond_none_ms"], 2)])  # fmt: skip
        if in_process:  # one request at a time: the p50 against the same sequence in one process
            one = "in_process_beyond_none_ms" in sp  # (concurrency 1 only)
            rows[-1] += [_f(sp["in_process_beyond_none_ms"], 2) if one else "—",
                         _f(sp["server_beyond_in_process_ms"], 2) if one else "—"]  # fmt: skip
    header = ["input form, beyond a PNG with `preprocess=none`", "concurrency", "own work ms",
              "own work ms after an inference",
              "core ms per request", "of it, the event loop's", "hand-offs and waiting", "p50 ms"]  # fmt: skip
    if in_process:
        header += ["in one process, ms", "the server's own, ms"]
    return _table(header, rows)


def gpu(name: str, d: dict[str, Any]) -> list[str]:
    m = d["machine"]
    versions = f" (Python {m['python']}, torch {m['torch']}, onnxruntime-gpu {m['onnxruntime']})"
    out = [*_fill("gpu", device=m["device"], provenance=_provenance(name, d, versions)), ""]
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
        fp32, fp16 = f"{a['ort_fp32']:.2%}", f"{a['ort_fp16']:.2%}"
        out += [*_fill("gpu_accuracy", images=_i(a["images"]), fp32=fp32, fp16=fp16, diff=f"{diff:.1e}"), ""]
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
        out += [*_fill("gpu_http"), "", *_table(header, rows), ""]
    out += _gpu_reading(d)
    return out


def _best(rows: list[dict[str, Any]], key: str = "requests_per_s") -> float:
    return max(r[key] for r in rows)


def _gpu_reading(d: dict[str, Any]) -> list[str]:
    """What the GPU tables say, as ratios computed from them."""
    c = {k: {r["batch"]: r for r in v} for k, v in d["cases"].items()}
    out = [*_fill("gpu_reading"), ""]
    if {"ort_fp32", "ort_fp16_cuda_graph"} <= set(c) and 1 in c["ort_fp32"]:
        b1 = c["ort_fp32"][1]["p50_ms"] / c["ort_fp16_cuda_graph"][1]["p50_ms"]
        out += _fill("gpu_b1", ms=_f(c["ort_fp16_cuda_graph"][1]["p50_ms"], 2), gain=f"{b1:.1f}")
    big = max(c.get("ort_fp32", {}) or [0])
    if big and "ort_fp16" in c and big in c["ort_fp16"]:
        gain = c["ort_fp16"][big]["images_per_s"] / c["ort_fp32"][big]["images_per_s"]
        out += _fill("gpu_fp16", batch=big, gain=f"{gain:.2f}")
    if "http" in d:
        rows = [r for r in d["http"] if r["body"] == d["http"][0]["body"]]
        one = _best([r for r in rows if r["workers"] == 1])
        many = [r for r in rows if r["workers"] > 1]
        if many:
            gpu_best = max(r["images_per_s"] for v in d["cases"].values() for r in v)
            out += _fill("gpu_workers", one=_i(one), gpu_best=_i(gpu_best), workers=many[0]["workers"],
                         many=_i(_best(many)), gain=f"{_best(many) / one:.1f}")  # fmt: skip
    return [*out, ""] if len(out) > 2 else []


def load(name: str, d: dict[str, Any]) -> list[str]:
    s, o, g = d["sustained_load"], d["overload"], d["graceful_shutdown"]
    ok, no = o["flood"]["status"]["200"], o["flood"]["status"]["503"]
    rec = o["recovery"]["status"].get("200", {"count": 0, "p99_ms": 0.0})
    late = g["after_sigterm_0_25_s"]
    figures = {
        "concurrency": s["concurrency"], "seconds": f"{s['seconds']:.0f}", "rps": _f(s["requests_per_s"]),
        "p50": _i(s["p50_ms"]), "p99": _i(s["p99_ms"]), "non_2xx": s["non_2xx"],
        "socket_errors": s["socket_errors"] or "no", "rss_warm": _f(s["rss_after_warmup_mb"]),
        "rss_max": _f(s["rss_max_mb"]), "rss_growth": f"{s['rss_growth']:+.1%}", "rss_end": _f(s["rss_end_mb"]),
        "queue_size": o["queue_size"], "max_in_flight": o["max_in_flight"],
        "capacity": _f(o["capacity_req_per_s"]), "offered": _f(o["offered_req_per_s"]),
        "o_seconds": f"{o['seconds']:.0f}", "ok": _i(ok["count"]), "ok_p50": _i(ok["p50_ms"]),
        "ok_p99": _i(ok["p99_ms"]), "no": _i(no["count"]), "retry_after": _i(o["rejected_with_retry_after"]),
        "no_p50": _i(no["p50_ms"]), "no_p99": _i(no["p99_ms"]), "rec": rec["count"],
        "rec_requests": o["recovery"]["requests"], "rec_p99": _i(rec["p99_ms"]),
        "in_flight": g["in_flight_at_sigterm"], "answered": g["in_flight_answered_200"],
        "before": sum(v["count"] for v in g["before_sigterm"]["status"].values()),
        "tries": late["requests"], "unanswered": late["status"].get("0", {"count": 0})["count"],
        "accepted": "accepted" if g["new_connection_accepted_after_0_5_s"] else "refused",
        "exit_s": _f(g["exit_after_sigterm_s"], 2),
        "logged": "logged" if g["clean_shutdown_logged"] else "not logged",
    }  # fmt: skip
    return [*_fill("load", provenance=_provenance(name, d, ""), **figures), ""]


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
    out = [*_fill("generic", name=name, provenance=_provenance(name, d, "")), ""]
    rows = [[f"`{k}`", f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in _scalars(d)]
    return out + _table(["figure", "value"], rows) + [""]


def preprocess(name: str, d: dict[str, Any]) -> list[str]:
    out = [*_fill("preprocess", provenance=_provenance(name, d, ""), baseline=d["baseline"]), ""]
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
    out = [*_fill("before_after"), ""]
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
    out = [*_fill("routing_before_after"), ""]
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

# Which precision where (its rows are the template's): the same table stands in docs/performance.md and
# in the README, between these two markers.
TABLE_START = "<!-- precision table: one row per CAPSNET_PRECISION value, from bench/results -->"
TABLE_END = "<!-- end precision table -->"


def int8_row(
    name: str, cpu_run: dict[str, Any], card: dict[str, Any], plain: tuple[str, dict[str, Any]] | None
) -> str:
    r = cpu_run["ratios"]
    q = card["int8"]
    elsewhere = (
        _fill("precision_int8_no_vnni", ratio=_f(plain[1]["ratios"]["int8_best_vs_fp32_best"]["value"], 2),
              name=plain[0])[0]
        if plain
        else ""
    )  # fmt: skip
    return _fill(
        "precision_int8",
        ratio=_f(r["int8_best_vs_fp32_best"]["value"], 2),
        baseline=_f(r["service_int8_c32_vs_baseline_c32"]["value"], 1),
        name=name,
        elsewhere=elsewhere,
        int8_accuracy=f"{q['test_accuracy']:.2%}",
        fp32_accuracy=f"{q['fp32_test_accuracy']:.2%}",
        near_ties=q["near_ties"]["images"],
    )[0]


# The run of today's shipped files first: the precision table reads the first of these that has int8 figures.
CURRENT_CPU_RUNS = ("cpu-2core-now.json", "cpu-2core-routing.json", "cpu-2core.json")
NO_VNNI_RUNS = ("cpu-2core-avx2.json",)  # the same on a CPU whose int8 kernels lack VNNI


def precision_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = [TABLE_START, *_fill("precision")]
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
    lines = [*_fill("page"), ""]
    runs = _runs(results)
    if {"cpu-2core-routing.json", "cpu-2core-routing-before.json"} <= set(runs):
        lines += routing_before_after(runs["cpu-2core-routing-before.json"], runs["cpu-2core-routing.json"])
    if {"cpu-2core.json", "cpu-2core-before-hotpath.json"} <= set(runs):
        lines += before_after(runs["cpu-2core-before-hotpath.json"], runs["cpu-2core.json"])
    for name, data in sorted(runs.items(), key=lambda kv: (kv[0] != CURRENT_CPU_RUNS[0], kv[0])):
        lines += RENDERERS.get(name, generic)(name, data)
    lines += [*_fill("gpu_host"), ""]  # how the first GPU host measures itself (bench/gpu_host.py)
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
