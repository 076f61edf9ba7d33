"""bench/gpu_host.py, the first run on a GPU host, run here on the CPU: every step of the real run (raw
onnxruntime in fp32 and fp16, `capsnet serve` with two workers under /predict load, v2 B = 64 over HTTP
and gRPC) with the CPU provider, its figures consistent and its answers the raw session's; and, without
a GPU, one clear line and exit 2 instead of a crash."""

from __future__ import annotations

import json

import pytest

from bench import gpu_host

QUICK = ["--batches", "1", "4", "--seconds", "0.2", "--http-seconds", "1", "--workers", "2"]


@pytest.mark.slow
def test_every_step_runs_on_the_cpu_and_its_figures_add_up(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert gpu_host.main(["--device", "cpu", *QUICK, "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["errors"] == {}
    assert 0 < r["seconds"] < 300  # the budget the real run has
    for precision, file in [("fp32", "capsnet.onnx"), ("fp16", "capsnet-fp16.onnx")]:
        case = r["raw"][precision]
        assert case["file"] == file and case["providers"] == ["CPUExecutionProvider"]
        assert [b["batch"] for b in case["batches"]] == [1, 4]
        for b in case["batches"]:
            assert b["runs"] >= 5 and 0 < b["p50_ms"] <= b["p99_ms"]
            # images/s is the batch over the median run, the p50
            assert b["images_per_s"] == pytest.approx(b["batch"] * 1e3 / b["p50_ms"], rel=1e-9)
    s = r["service"]
    assert s["workers"] == 2 and s["providers"] == ["CPUExecutionProvider"]
    assert s["predict"]["requests_per_s"] > 0 and s["predict"]["non_200"] == 0
    assert s["predict"]["concurrency"] == 64
    http, grpc = s["v2_http"], s["v2_grpc"]
    assert http["batch"] == grpc["batch"] == 64 and http["non_200"] == 0
    assert http["images_per_s"] == pytest.approx(64 * http["requests_per_s"]) and http["images_per_s"] > 0
    assert grpc["calls"] >= 1 and grpc["images_per_s"] > 0
    # both v2 paths answer what onnxruntime answers for the same 64 images
    assert http["max_abs_diff_vs_raw"] < 1e-5 and grpc["max_abs_diff_vs_raw"] < 1e-5
    assert s["tracebacks_in_log"] == 0
    assert set(r["memory"]) == {"before", "after_raw", "service_up", "after"}  # nvidia-smi's, on a GPU
    printed = capsys.readouterr().out
    assert "raw fp32 on CPUExecutionProvider: B=1: " in printed and "/predict " in printed


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("capsnet.service.engine.cuda_driver_present", lambda: False)
    out = tmp_path / "host.json"
    assert gpu_host.main(["--output", str(out)]) == 2
    r = json.loads(out.read_text())
    assert r["raw"] == {} and "service" not in r
    assert r["errors"]["gpu"].startswith("no NVIDIA driver (libcuda.so.1) is visible")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_host: no usable GPU: no NVIDIA driver")


def test_a_failing_step_is_recorded_and_the_run_goes_on(tmp_path, capsys):
    out = tmp_path / "host.json"
    missing = tmp_path / "no-model"
    assert gpu_host.main(["--device", "cpu", *QUICK, "--model-dir", str(missing), "--output", str(out)]) == 1
    r = json.loads(out.read_text())
    assert set(r["errors"]) == {"raw fp32", "fp16 model", "reference"}
    assert "NO_SUCHFILE" in r["errors"]["raw fp32"] or "No such file" in r["errors"]["raw fp32"]
    assert r["raw"]["fp32"] is None and "service" not in r
    assert "FAILED raw fp32: " in capsys.readouterr().out
