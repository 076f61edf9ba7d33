"""The fp16 variant: same API, convolutions and matrix products in half precision, the rest in fp32."""

import collections
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from capsnet.model_export.card import evaluate_onnx
from capsnet.model_export.data import load_split
from capsnet.model_export.fp16 import FP16_FILE, to_fp16, write_fp16
from capsnet.service.settings import SHIPPED_MODEL
from tests.factories import mnist_test_images

FP16_IMAGES = 1000  # MNIST test images compared class by class with fp32 (about 5 s per precision)
FP16_RTOL = 2e-3  # of the largest value of each output; measured: 2e-4 (shipped), 3e-4 (tiny)


def assert_fp16_close(half: np.ndarray, full: np.ndarray, name: str) -> None:
    """Within FP16_RTOL of the output's largest value: zeros (a graph that lost its values) miss that by
    a factor 1 / FP16_RTOL = 500, and so does anything wrong by more than 0.2 % of the scale."""
    scale = float(np.abs(full).max())
    assert half.dtype == np.float32 and half.shape == full.shape and scale > 0, name
    np.testing.assert_allclose(half, full, rtol=0, atol=FP16_RTOL * scale, err_msg=name)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _inputs_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor a node reads (inferred)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.input})
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return types


def test_heavy_ops_read_fp16_and_everything_else_fp32(tiny_model_dir):
    model = onnx.load(str(tiny_model_dir / "capsnet.onnx"))
    half = to_fp16(model)
    types = _inputs_types(half)
    heavy = collections.Counter()
    for node in half.graph.node:
        if node.op_type in ("Conv", "MatMul"):
            heavy[node.op_type] += 1
            assert all(types[name] == TensorProto.FLOAT16 for name in node.input if name), node.name
        elif node.op_type in ("Exp", "ReduceMax", "Sqrt", "Div", "ReduceSum"):
            assert types[node.input[0]] == TensorProto.FLOAT, node.name  # (ReduceSum's axes are int64)
    assert heavy == {"Conv": 2, "MatMul": 5}, heavy  # the routing's 5 products at r = 3
    # The API is unchanged: same names, fp32 in and out.
    before = list(model.graph.input) + list(model.graph.output)
    for a, b in zip(before, list(half.graph.input) + list(half.graph.output), strict=True):
        assert a.name == b.name and b.type.tensor_type.elem_type == TensorProto.FLOAT
    # Each reordering of W is read by two iterations' products but cast once.
    casts = collections.Counter(n.input[0] for n in half.graph.node if n.op_type == "Cast")
    assert max(casts.values()) == 1
    # The convolution weights are stored in half precision.
    inits = {i.name: i for i in half.graph.initializer}
    assert inits["model.primary.conv.weight"].data_type == TensorProto.FLOAT16


def test_fp16_outputs_stay_close_to_fp32_and_classify_alike(tiny_model_dir):
    model = onnx.load(str(tiny_model_dir / "capsnet.onnx"))
    x = mnist_test_images(32)
    ref = _session(model).run(None, {"image": x})
    got = _session(to_fp16(model)).run(None, {"image": x})
    names = [o.name for o in model.graph.output]
    for name, a, b in zip(names, ref, got, strict=True):
        assert_fp16_close(b, a, name)
    probs = names.index("probabilities")
    assert (got[probs].argmax(1) == ref[probs].argmax(1)).all()
    # The coupling rows remain distributions over the parents.
    np.testing.assert_allclose(got[names.index("coupling")].sum(-1), 1.0, atol=1e-5)


def test_write_fp16_puts_the_variant_beside_the_model_with_its_precision(tiny_model_dir, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    path = write_fp16(d)
    assert path == d / FP16_FILE
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["precision"] == "fp16"
    original = {p.key: p.value for p in onnx.load(str(d / "capsnet.onnx")).metadata_props}
    meta.pop("precision")
    original.pop("precision", None)
    assert meta == original
    assert path.stat().st_size < (d / "capsnet.onnx").stat().st_size  # the conv weights in half


@pytest.mark.parametrize("op", ["Relu"])
def test_ops_outside_the_list_are_untouched(tiny_model_dir, op):
    model = onnx.load(str(tiny_model_dir / "capsnet.onnx"))
    half = to_fp16(model, ops=("Conv",))
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert [n for n in half.graph.node if n.op_type == "MatMul"] == matmuls
    assert sum(n.op_type == op for n in half.graph.node) == sum(n.op_type == op for n in model.graph.node)


def test_a_graph_with_subgraphs_is_refused():
    """Nodes inside an If's branches would read values the rewrite renames: one static graph only."""
    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])

    def branch(name: str) -> onnx.GraphProto:
        out = onnx.helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2, 2])
        return onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["x", "x"], [out.name])], name, [], [out]
        )

    cond = onnx.helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    switch = onnx.helper.make_node("If", ["cond"], ["y"], then_branch=branch("a"), else_branch=branch("b"))
    model = onnx.helper.make_model(onnx.helper.make_graph([switch], "g", [cond, x], [y]))
    onnx.checker.check_model(model)
    with pytest.raises(
        ValueError, match=r"holds subgraphs \(in \['If'\]\); re-export it as one static graph"
    ):
        to_fp16(model)


def test_capsnet_fp16_command_writes_the_variant_or_says_what_is_missing(tiny_model_dir, tmp_path):
    import shutil
    import subprocess
    import sys

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    ok = subprocess.run([sys.executable, "-m", "capsnet", "fp16", str(d)], capture_output=True, text=True)
    assert ok.returncode == 0 and f"wrote {d / FP16_FILE}" in ok.stdout
    assert onnx.load(str(d / FP16_FILE)).graph.input[0].name == "image"
    bad = subprocess.run(
        [sys.executable, "-m", "capsnet", "fp16", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "capsnet.onnx not found" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_fp16_of_the_shipped_model_predicts_every_class_of_fp32(tmp_path):
    """README: the fp16 variant keeps the shipped model's accuracy; checked here on the CPU provider."""
    shutil.copy(SHIPPED_MODEL / "capsnet.onnx", tmp_path / "capsnet.onnx")  # never write into models/
    half = write_fp16(tmp_path)
    x, y = load_split("mnist", "test")
    x, y = x[:FP16_IMAGES], y[:FP16_IMAGES]
    full_pred, half_pred = evaluate_onnx(tmp_path / "capsnet.onnx", x), evaluate_onnx(half, x)
    accuracy = {"fp32": float((full_pred == y).mean()), "fp16": float((half_pred == y).mean())}
    print(f"accuracy on the first {FP16_IMAGES} MNIST test images: {accuracy}")  # shown with -s
    assert np.flatnonzero(half_pred != full_pred).tolist() == []  # image by image, not only the rate
    assert accuracy["fp16"] == accuracy["fp32"] >= 0.99
    # and the numbers behind them, on the shipped model's real magnitudes
    xs = (x[:64].astype(np.float32) / 255.0)[:, None]
    names = ["probabilities", "poses", "coupling", "primary_activations"]
    full = ort.InferenceSession(str(tmp_path / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    fp16 = ort.InferenceSession(str(half), providers=["CPUExecutionProvider"])
    for name, a, b in zip(names, full.run(names, {"image": xs}), fp16.run(names, {"image": xs}), strict=True):
        assert_fp16_close(b, a, name)
