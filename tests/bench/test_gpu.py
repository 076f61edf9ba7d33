"""bench.gpu runs on the CPU in CI (the same code, few iterations) so that it cannot rot."""

import json

from bench.gpu import main, static_batch


def test_gpu_bench_on_cpu_writes_every_case_and_fp16_accuracy(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    args = f"--device cpu --model-dir {tiny_model_dir} --batches 1 3 --iters 3 --workdir {tmp_path}"
    main([*args.split(), "--output", str(out)])
    r = json.loads(out.read_text())
    assert r["machine"]["providers_fp32"] == ["CPUExecutionProvider"]
    ort_cases = {f"ort_{p}{io}" for p in ("fp32", "fp16") for io in ("", "_iobinding")}
    assert set(r["cases"]) == {"pytorch_eager", *ort_cases}
    for rows in r["cases"].values():
        assert [row["batch"] for row in rows] == [1, 3]
        assert all(row["p50_ms"] > 0 and row["images_per_s"] > 0 for row in rows), rows
    assert "ort_fp32_iobinding" in capsys.readouterr().out


def test_static_batch_fixes_the_batch_axis_of_inputs_and_outputs(tiny_model_dir):
    import onnx

    model = onnx.load(str(tiny_model_dir / "capsnet.onnx"))
    fixed = static_batch(model, 32)
    for v in list(fixed.graph.input) + list(fixed.graph.output):
        assert v.type.tensor_type.shape.dim[0].dim_value == 32
    # The original is untouched.
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_gpu_bench_http_part_on_cpu_answers_every_case(tiny_model_dir, tmp_path):
    import argparse

    from PIL import Image

    from bench.gpu import http, http_cases
    from tests.factories import mnist_test_images

    body = tmp_path / "digit.png"
    Image.fromarray((255 - mnist_test_images(1)[0, 0] * 255).astype("uint8")).save(body)
    args = argparse.Namespace(
        model_dir=tiny_model_dir,
        device="cpu",
        http_bodies=[str(body)],
        http_seconds=0.5,
        concurrency=[2],
        http_cases=http_cases(2),
    )
    rows = http(args)
    assert [(r["case"], r["workers"]) for r in rows] == [
        ("batcher_on", 1),
        ("batcher_off", 1),
        ("batcher_on_2_workers", 2),
    ]
    for r in rows:
        assert r["requests_per_s"] > 0 and r["non_200"] == 0 and r["p50_ms"] > 0, r
