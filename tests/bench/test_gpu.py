"""bench.gpu runs on the CPU in CI (the same code, few iterations) so that it cannot rot; on a machine
with a GPU it also runs on CUDA with the shipped model, accuracy asserted."""

import json

import numpy as np
import pytest

from bench.gpu import main, static_batch
from capsnet.model_export.data import load_split
from capsnet.service.settings import SHIPPED_MODEL
from tests.checks import predicted_classes


def devices() -> list[str]:
    """cpu everywhere (CI); cuda too where there is a GPU, on the shipped model."""
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", devices())
def test_gpu_bench_writes_every_case_and_fp16_accuracy(device, tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir if device == "cpu" else SHIPPED_MODEL
    out = tmp_path / "gpu.json"
    args = (
        f"--device {device} --model-dir {model_dir} --batches 1 3 --iters 3 --workdir {tmp_path} --accuracy"
    )
    main([*args.split(), "--output", str(out)])
    r = json.loads(out.read_text())
    provider = "CPUExecutionProvider" if device == "cpu" else "CUDAExecutionProvider"
    assert r["machine"]["providers_fp32"][0] == provider
    ort_cases = {f"ort_{p}{io}" for p in ("fp32", "fp16") for io in ("", "_iobinding")}
    if device == "cuda":
        ort_cases |= {"pytorch_eager_fp16", "ort_fp32_cuda_graph", "ort_fp16_cuda_graph"}
    assert set(r["cases"]) == {"pytorch_eager", *ort_cases}
    for rows in r["cases"].values():
        assert [row["batch"] for row in rows] == [1, 3]
        assert all(row["p50_ms"] > 0 and row["images_per_s"] > 0 for row in rows), rows
    assert "ort_fp32_iobinding" in capsys.readouterr().out
    # The accuracy path: every test image, fp32 as computed here, fp16 within 2 images of it.
    acc = r["accuracy"]
    images, labels = load_split("mnist", "test")
    assert acc["images"] == len(labels) == 10_000
    if device == "cpu":  # the tiny untrained model: about chance, but exactly its own
        assert acc["ort_fp32"] == float(
            (predicted_classes(model_dir / "capsnet.onnx", images) == labels).mean()
        )
    else:  # the shipped model on CUDA: its card's figure
        card = json.loads((SHIPPED_MODEL / "model_card.json").read_text())
        assert acc["ort_fp32"] == pytest.approx(card["evaluation"]["test_accuracy"], abs=1e-4)
    assert abs(acc["ort_fp16"] - acc["ort_fp32"]) <= 2 / len(labels)
    # fp16 differs from fp32 (it is another graph), by less than 0.2 % of a capsule length
    diffs = acc["fp16_max_abs_diff"]
    assert set(diffs) == {"probabilities", "poses"}
    assert all(0 < d < 2e-3 for d in diffs.values()), diffs


def test_static_batch_fixes_the_batch_axis_of_inputs_and_outputs(tiny_model_dir):
    import onnx

    model = onnx.load(str(tiny_model_dir / "capsnet.onnx"))
    fixed = static_batch(model, 32)
    for v in list(fixed.graph.input) + list(fixed.graph.output):
        assert v.type.tensor_type.shape.dim[0].dim_value == 32
    # The original is untouched.
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("B", [1, 5])
def test_static_batch_keeps_the_graph_and_answers_what_the_dynamic_model_answers(tiny_model_dir, B):
    """A CUDA graph captures the exported classifier as it is: one static graph, no control flow to
    take out; fixing the batch axis changes no node and no number."""
    import onnx
    import onnxruntime as ort

    from capsnet.model_export.export import graph_control_flow
    from tests.factories import mnist_test_images

    model = onnx.load(str(tiny_model_dir / "capsnet.onnx"))
    fixed = static_batch(model, B)
    onnx.checker.check_model(fixed, full_check=True)
    assert graph_control_flow(model) == []
    assert list(fixed.graph.node) == list(model.graph.node)
    x = mnist_test_images(B)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"image": x}
    )
    got = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"image": x}
    )
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


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
