"""The benchmark runs in a quick mode in CI so it cannot rot; its figures are not asserted as speed."""

import json
import statistics

import pytest

from bench.bench import (
    FORM_DEFAULT,
    FORM_JSON,
    FORM_MULTIPART,
    FORM_NONE,
    FORM_SCAN,
    FORM_V2,
    OWN_CALLS_PER_PASS,
    form_split,
    main,
    per_run_cost,
    ratios,
)
from capsnet.service.cpu import vector_extensions
from capsnet.service.engine import available_cores
from capsnet.service.settings import SHIPPED_MODEL
from tests.tools import installed_tool


@pytest.mark.slow
def test_quick_benchmark_writes_every_case_and_ratio(tmp_path, capsys):
    installed_tool("wrk", "Debian package wrk")
    out = tmp_path / "bench.json"
    main(model_dir=SHIPPED_MODEL, output=out, quick=True, iterations=3, seconds=1.0)
    r = json.loads(out.read_text())
    assert {row["batch"] for row in r["raw"]["onnxruntime"]} == {1, 8, 32, 128}
    # the shipped directory holds capsnet-int8.onnx, so its rows (raw and over HTTP) are in the run
    assert set(r["raw"]) == {
        "onnxruntime",
        "onnxruntime_side_by_side",
        "conv_only_ceiling",
        "pytorch_eager",
        "onnxruntime_int8",
    }
    side = r["raw"]["onnxruntime_side_by_side"]
    if available_cores() > 1:  # one batch per core, all at once
        assert [row["batch"] for row in side] == [1, 8, 32, 128]
        assert all(row["batches_at_once"] == available_cores() for row in side)
        assert all(row["core_ms_per_image"] > 0 for row in side)
    assert all(row["vs_fp32_alternating"] > 0 for row in r["raw"]["onnxruntime_int8"])
    assert r["machine"]["vector_extensions"] == vector_extensions()
    for rows in r["raw"].values():
        assert all(row["images_per_s"] > 0 and row["p50_ms"] > 0 for row in rows)
    cases = {(h["case"], h["connections"]) for h in r["http"]}
    assert ("service, batcher on", 32) in cases and ("service, batcher off", 64) in cases
    assert ("FastAPI + PyTorch baseline", 32) in cases and ("service int8, batcher on", 32) in cases
    for h in r["http"]:
        assert h["requests_per_s"] > 0 and h["non_2xx"] == 0, h
        # the event loop's thread is one of the server's: its share of the core time is a part of it
        assert 0 < h["event_loop_core_ms_per_request"] <= h["server_core_ms_per_request"], h
        if h["case"].startswith("FastAPI"):  # no batcher, no /metrics
            assert "mean_batch" not in h
        elif h["connections"] == 1 or h["case"] == "service, batcher off":  # one request at a time, or B <= 1
            assert h["mean_batch"] == 1.0, h
        else:
            assert 1.0 <= h["mean_batch"] <= min(h["connections"], 64), h
    again = r["raw_again"]  # the references once more, after the HTTP cases
    assert set(again) == {"onnxruntime", "onnxruntime_side_by_side", "conv_only_ceiling"}
    assert [row["batch"] for row in again["onnxruntime"]] == [1, 8, 32, 128]
    assert all(row["pass"] == 2 and row["images_per_s"] > 0 for rows in again.values() for row in rows)
    ort = r["raw"]["onnxruntime"] + again["onnxruntime"]
    side = side + again["onnxruntime_side_by_side"]
    assert all(row["core_ms_per_image"] > 0 for row in ort)
    best = max(ort, key=lambda row: row["images_per_s"])  # one session at its best batch, either pass
    cheapest = min(ort + side, key=lambda row: row["core_ms_per_image"])  # onnxruntime's own cost
    on32 = next(h for h in r["http"] if h["case"] == "service, batcher on" and h["connections"] == 32)
    overhead = r["ratios"]["overhead_ms_per_request"]["value"]
    assert overhead == pytest.approx(on32["server_core_ms_per_request"] - cheapest["core_ms_per_image"])
    c32 = r["ratios"]["service_c32_vs_ort_best"]["value"]
    assert c32 == pytest.approx(on32["requests_per_s"] / best["images_per_s"])
    conv = max(row["images_per_s"] for row in r["raw"]["conv_only_ceiling"] + again["conv_only_ceiling"])
    b1 = min(row["p50_ms"] for row in ort if row["batch"] == 1)  # the faster of the two passes
    on1 = next(h for h in r["http"] if h["case"] == "service, batcher on" and h["connections"] == 1)
    assert r["ratios"]["service_c1_p50_minus_ort_b1_ms"]["value"] == pytest.approx(on1["p50_ms"] - b1)
    assert r["ratios"]["ort_best_vs_conv_ceiling"]["value"] == pytest.approx(best["images_per_s"] / conv)
    assert set(r["ratios"]) == {
        "service_c32_vs_ort_best",
        "overhead_ms_per_request",
        "service_c1_p50_minus_ort_b1_ms",
        "ort_best_vs_conv_ceiling",
        "service_c32_vs_baseline_c32",
        "grpc_b64_vs_ort_b64",
        "int8_best_vs_fp32_best",
        "service_int8_c32_vs_baseline_c32",
        "default_c32_vs_none_c32",
        "default_c1_p50_beyond_none_and_preprocessing_ms",
        "scan_c1_added_vs_preprocessing",
        "json_c32_vs_ort_best",
    }
    # the input forms, on one server, each with its own work timed alone
    forms = {(h["case"], h["connections"]): h for h in r["http"] if "own_cost_ms" in h}
    names = [FORM_NONE, FORM_DEFAULT, FORM_SCAN, FORM_JSON, FORM_MULTIPART, FORM_V2]
    assert set(forms) == {(name, c) for name in names for c in (1, 32)}
    own = {name: forms[name, 1]["own_cost_ms"] for name in names}
    assert own[FORM_SCAN] > own[FORM_DEFAULT] > own[FORM_NONE] > 0 and own[FORM_MULTIPART] > own[FORM_NONE]
    split = form_split(r, FORM_SCAN, 1)
    assert split["own_work_ms"] == pytest.approx(own[FORM_SCAN] - own[FORM_NONE])
    cold = (
        forms[FORM_SCAN, 1]["own_cost_after_inference_ms"]
        - forms[FORM_NONE, 1]["own_cost_after_inference_ms"]
    )
    assert split["hand_offs_ms"] == pytest.approx(split["beyond_none_core_ms"] - cold)
    # the same sequence without a server: the work after an inference, then the next inference, timed
    # per call, so the median of the sums exceeds the work's own median
    assert all(h["in_process_ms"] > h["own_cost_after_inference_ms"] and h["inference_after_own_ms"] > 0
               for h in forms.values())  # fmt: skip
    in_process = forms[FORM_SCAN, 1]["in_process_ms"] - forms[FORM_NONE, 1]["in_process_ms"]
    assert split["in_process_beyond_none_ms"] == pytest.approx(in_process)
    assert split["server_beyond_in_process_ms"] == pytest.approx(split["p50_beyond_none_ms"] - in_process)
    server_own = r["ratios"]["scan_c1_added_vs_preprocessing"]["why"]
    assert f"so the server's p50 adds {split['server_beyond_in_process_ms']:+.2f} ms of its own" in server_own
    assert all(h["rounds"] == 2 and h["own_cost_after_inference_ms"] > 0 for h in forms.values())
    # each form's own work timed before each of the 4 passes, alone and after an inference
    assert all(h["own_cost_calls"] == 4 * OWN_CALLS_PER_PASS for h in forms.values())
    after = forms[FORM_SCAN, 1]["own_cost_after_inference_ms"]
    scan_added = forms[FORM_SCAN, 1]["p50_ms"] - forms[FORM_NONE, 1]["p50_ms"]
    why = r["ratios"]["scan_c1_added_vs_preprocessing"]["why"]
    assert f"({scan_added / after:.2f} x the {after:.2f} ms it takes right after an inference)" in why
    none32, default32 = forms[FORM_NONE, 32], forms[FORM_DEFAULT, 32]
    c32 = r["ratios"]["default_c32_vs_none_c32"]["value"]
    assert c32 == pytest.approx(default32["requests_per_s"] / none32["requests_per_s"])
    added = (forms[FORM_SCAN, 1]["p50_ms"] - forms[FORM_NONE, 1]["p50_ms"]) / own[FORM_SCAN]
    assert r["ratios"]["scan_c1_added_vs_preprocessing"]["value"] == pytest.approx(added)
    # JSON against raw onnxruntime at its best batch of the raw pass, timed before each of the 4 passes
    ref = r["forms_reference"]
    assert ref["batch"] == max(r["raw"]["onnxruntime"], key=lambda row: row["images_per_s"])["batch"]
    assert len(ref["passes"]) == 4 and min(ref["passes"]) > 0
    assert ref["images_per_s"] == pytest.approx(statistics.median(ref["passes"]))
    json32 = forms[FORM_JSON, 32]["requests_per_s"]
    assert r["ratios"]["json_c32_vs_ort_best"]["value"] == pytest.approx(json32 / ref["images_per_s"])
    assert "the median of 4 runs between the forms' passes" in r["ratios"]["json_c32_vs_ort_best"]["why"]
    g = r["grpc"]
    assert (g["batch"], g["streams"]) == (64, 4) and g["calls"] >= g["streams"] and g["images_per_s"] > 0
    assert g["onnxruntime_b64"]["batch"] == 64 and g["onnxruntime_b64"]["images_per_s"] > 0
    assert len(g["rounds"]["onnxruntime_images_per_s"]) == len(g["rounds"]["grpc_images_per_s"]) == 1
    assert r["ratios"]["grpc_b64_vs_ort_b64"]["value"] == pytest.approx(
        g["images_per_s"] / g["onnxruntime_b64"]["images_per_s"]
    )
    assert all(isinstance(v["met"], bool) for v in r["ratios"].values())
    assert 0 < r["profile"]["conv_share"] < 1 and r["profile"]["batch"] == 32
    assert 0 < r["profile_int8"]["conv_share"] < 1 and "QLinearConv" in r["profile_int8"]["by_op"]
    # Each ratio says what it is made of, with figures of this run in it.
    for name, ratio in r["ratios"].items():
        assert any(ch.isdigit() for ch in ratio["why"]), name
    assert f"{r['profile']['conv_share']:.1%}" in r["ratios"]["ort_best_vs_conv_ceiling"]["why"]
    assert f"held {on32['mean_batch']:.1f} images" in r["ratios"]["overhead_ms_per_request"]["why"]
    printed = capsys.readouterr().out
    assert "ratios and their targets:" in printed and "tritonclient.grpc, raw" in printed
    assert f"{FORM_SCAN:<32}    1" in printed  # the input forms' table


def test_profile_splits_kernel_time_between_convolutions_and_the_rest(tiny_model_dir):
    from bench.profile import profile

    for batch in (1, 5):
        r = profile(tiny_model_dir, batch=batch, runs=2)
        assert r["runs"] == 2 and r["kernel_ms_per_run"] > 0
        assert sum(r["by_op"].values()) == pytest.approx(1.0, abs=1e-3)
        assert 0 < r["conv_share"] < 1 and r["conv_share"] + r["after_conv_share"] == pytest.approx(1.0)
        assert {"Conv", "Exp", "MatMul"} <= set(r["by_op"])  # the routing's ops, after the convolutions


def test_core_time_side_by_side_gives_a_rate_per_file_and_batch(tiny_model_dir, capsys):
    from bench.profile import core_time, main

    rates = core_time(tiny_model_dir, ["capsnet.onnx", "capsnet.onnx"], batches=(1, 4), reps=2)
    assert list(rates) == ["capsnet.onnx"] and set(rates["capsnet.onnx"]) == {1, 4}
    assert all(r > 0 for r in rates["capsnet.onnx"].values())
    main(["--model-dir", str(tiny_model_dir), "--core-time"])
    assert "B = 128" in capsys.readouterr().out


def _row(batch: int, images_per_s: float, core_ms: float, **kw: object) -> dict[str, object]:
    return {"batch": batch, "p50_ms": batch * 1e3 / images_per_s, "p99_ms": 0.0,
            "images_per_s": images_per_s, "core_ms_per_image": core_ms, **kw}  # fmt: skip


@pytest.mark.parametrize("slow_pass", [1, 2])
def test_ratios_take_the_stricter_of_the_two_reference_passes(slow_pass):
    # One pass of the references was slowed by other work (half the speed): whichever it was, the
    # ratios must divide by the fast pass, never flatter the service with the slow one.
    fast = {
        "onnxruntime": [_row(1, 400.0, 5.0), _row(8, 450.0, 4.4)],
        "onnxruntime_side_by_side": [_row(8, 455.0, 4.3, batches_at_once=2)],
        "conv_only_ceiling": [_row(8, 550.0, 0.0)],
    }
    slow = {k: [dict(row, images_per_s=row["images_per_s"] / 2, p50_ms=row["p50_ms"] * 2,
                     core_ms_per_image=row["core_ms_per_image"] * 2) for row in rows]
            for k, rows in fast.items()}  # fmt: skip
    first, second = (slow, fast) if slow_pass == 1 else (fast, slow)
    second = {k: [dict(row, **{"pass": 2}) for row in rows] for k, rows in second.items()}
    http = [
        {"case": "service, batcher on", "connections": c, "requests_per_s": rps, "p50_ms": p50,
         "server_core_ms_per_request": 4.6, "event_loop_core_ms_per_request": 0.25, "server_cpu_cores": 1.9}
        for c, rps, p50 in ((1, 300.0, 2.9), (32, 420.0, 75.0))
    ] + [{"case": "FastAPI + PyTorch baseline", "connections": 32, "requests_per_s": 110.0}]  # fmt: skip
    grpc = {"images_per_s": 430.0, "onnxruntime_b64": {"images_per_s": 410.0, "p50_ms": 150.0}, "streams": 4,
            "batch": 64, "outputs": ["probabilities"], "p50_ms": 560.0, "server_cpu_cores": 1.9}  # fmt: skip
    r = {"raw": first, "raw_again": second, "http": http, "grpc": grpc, "machine": {"cores": 2}}
    got = {k: v["value"] for k, v in ratios(r).items()}
    assert got["service_c32_vs_ort_best"] == pytest.approx(420.0 / 450.0)
    assert got["overhead_ms_per_request"] == pytest.approx(4.6 - 4.3)
    assert got["service_c1_p50_minus_ort_b1_ms"] == pytest.approx(2.9 - 2.5)
    assert got["ort_best_vs_conv_ceiling"] == pytest.approx(450.0 / 550.0)


def test_per_run_cost_recovers_the_cost_per_image_and_per_run_from_the_faster_rows():
    # core ms per image = 4.0 + 1.2 / B; a second, slower pass of the same batches must not pull it up
    rows = [{"batch": b, "core_ms_per_image": 4.0 + 1.2 / b} for b in (1, 8, 32, 128)]
    slow = [dict(row, core_ms_per_image=row["core_ms_per_image"] * 1.5) for row in rows]
    c, fixed = per_run_cost(slow + rows)
    assert c == pytest.approx(4.0) and fixed == pytest.approx(1.2)


def test_the_benchmarks_run_as_modules_of_the_checkout_not_as_capsnet_subcommands():
    """bench/ stays out of the wheel: `python -m bench` and `python -m bench.load` from the repository
    root, with the options the docs give; the installed `capsnet` command has no such subcommands."""
    import subprocess
    import sys
    from pathlib import Path

    import bench.load
    from bench.__main__ import parse_args
    from capsnet.cli import build_parser

    a = parse_args(["--quick", "--seconds", "1", "--output", "x.json"])
    assert (a.quick, a.seconds, a.iterations, a.output) == (True, 1.0, 30, Path("x.json"))
    assert parse_args([]).model_dir == Path("models/capsnet-mnist")
    b = bench.load.parse_args(["--seconds", "20"])
    assert (b.seconds, b.concurrency, b.output) == (20.0, 64, None)
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("usage: python -m bench "), run.stderr
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench"])
