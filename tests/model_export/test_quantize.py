"""The int8 variant: convolutions in int8 from training-image ranges, same API, refused if it loses
accuracy; a tiny seeded model quantized in a fixture."""

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

import capsnet.model_export.quantize as quantize
from capsnet.model_export.data import load_split
from capsnet.model_export.export import graph_control_flow
from capsnet.model_export.quantize import INT8_FILE, QuantizeError, calibration_images, write_int8
from capsnet.service.cpu import host
from capsnet.service.settings import SHIPPED_MODEL
from tests.factories import mnist_test_images

TEST_LIMIT = 1000  # test images for the accuracy gate in these tests (the shipped file: all 10,000)


@pytest.fixture(scope="module")
def int8_dir(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(tiny_model_dir, d)
    # An untrained tiny model's predictions are near ties, so the gate is loose here; its own test is below.
    report = write_int8(d, calibration=64, test_limit=TEST_LIMIT, max_drop=1.0)
    return d, report


def _session(path, **options):
    so = ort.SessionOptions()
    for k, v in options.items():
        setattr(so, k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_convolutions_run_in_int8_and_the_routing_in_fp32(int8_dir, tmp_path):
    d, _ = int8_dir
    proto = onnx.load(str(d / INT8_FILE))
    assert graph_control_flow(proto) == []  # still one static graph
    # What onnxruntime runs: both convolutions as QLinearConv (the ReLU folded in), no fp32 Conv left.
    _session(d / INT8_FILE, optimized_model_filepath=str(tmp_path / "opt.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops and "Relu" not in ops
    # r = 3 routing iterations in fp32, after the convolutions: the first's coupling is uniform
    # (b = 0), the other two each take a softmax over the parents (exported as Exp over a sum)
    assert ops.index("QLinearConv") < ops.index("Exp") and ops.count("Exp") == 2 and ops.count("Softmax") == 0
    # Weights: the convolutions' int8 per output channel, DigitCaps' W untouched in fp32.
    inits = {i.name: i for i in proto.graph.initializer}
    conv_w = [i for n, i in inits.items() if "primary.conv.weight" in n and len(i.dims) == 4]
    assert len(conv_w) == 1 and conv_w[0].data_type == onnx.TensorProto.INT8 and conv_w[0].dims[0] == 4 * 8
    scales = [i for n, i in inits.items() if "primary.conv.weight" in n and "scale" in n]
    assert scales and scales[0].dims == [32]  # one scale per output channel
    # W keeps its fp32 values, stored once under its own name: quant_pre_process does not fold the
    # graph's three reorderings of it into three initializers (onnxruntime does when it loads the file).
    W = onnx.numpy_helper.to_array(
        next(i for i in onnx.load(str(d / "capsnet.onnx")).graph.initializer if i.name == "model.digits.W")
    )
    (held,) = [i for i in proto.graph.initializer if int(np.prod(i.dims)) == W.size]
    assert held.name == "model.digits.W" and held.data_type == onnx.TensorProto.FLOAT
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(held), W)


def test_same_inputs_outputs_and_metadata_plus_the_precision(int8_dir):
    d, report = int8_dir
    full, q = _session(d / "capsnet.onnx"), _session(d / INT8_FILE)
    for a, b in ((full.get_inputs(), q.get_inputs()), (full.get_outputs(), q.get_outputs())):
        assert [(x.name, x.type, x.shape) for x in a] == [(x.name, x.type, x.shape) for x in b]
    meta = dict(q.get_modelmeta().custom_metadata_map)
    recorded = json.loads(meta.pop("quantization"))
    assert meta.pop("precision") == "int8"
    assert meta == dict(full.get_modelmeta().custom_metadata_map)  # name, version, labels unchanged
    assert recorded["calibration"] == {
        "dataset": "mnist",
        "split": "train",
        "images": 64,
        "seed": 0,
        "method": "MinMax",
    }
    assert recorded["test_accuracy"] == report["test_accuracy"] and recorded["test_images"] == TEST_LIMIT


def test_int8_outputs_follow_fp32(int8_dir):
    d, _ = int8_dir
    x = mnist_test_images(64)
    ref = _session(d / "capsnet.onnx").run(None, {"image": x})
    got = _session(d / INT8_FILE).run(None, {"image": x})
    names = ("probabilities", "poses", "coupling", "primary_activations")
    for name, a, b in zip(names, ref, got, strict=True):
        assert b.dtype == np.float32 and b.shape == a.shape, name
        # Within 3 % of each output's own scale: int8 ranges, not a different model.
        assert np.abs(b - a).max() <= 0.03 * np.abs(a).max(), name
    np.testing.assert_allclose(got[2].sum(-1), 1.0, atol=1e-5)  # coupling rows stay distributions
    assert (got[0].argmax(1) == ref[0].argmax(1)).mean() >= 0.9


def test_report_figures_are_measured_not_assumed(int8_dir):
    d, report = int8_dir
    x, y = load_split("mnist", "test")
    from capsnet.model_export.card import evaluate_onnx, onnx_probabilities

    for prefix, path in (("", d / INT8_FILE), ("fp32_", d / "capsnet.onnx")):
        preds = evaluate_onnx(path, x[:TEST_LIMIT])
        assert report[f"{prefix}test_accuracy"] == float((preds == y[:TEST_LIMIT]).mean())
        assert report[f"{prefix}errors"] == int((preds != y[:TEST_LIMIT]).sum())
    assert report["bytes"] == (d / INT8_FILE).stat().st_size < (d / "capsnet.onnx").stat().st_size
    int8 = onnx_probabilities(d / INT8_FILE, x[:TEST_LIMIT])
    moved = np.abs(int8 - onnx_probabilities(d / "capsnet.onnx", x[:TEST_LIMIT])).max(1)
    assert report["vs_fp32"] == {"max": float(moved.max()), "p99": float(np.quantile(moved, 0.99))}
    top2 = np.sort(int8, axis=1)[:, -2:]
    ties = int((top2[:, 1] - top2[:, 0] < quantize.CROSS_CPU_MARGIN).sum())
    assert report["near_ties"] == {"margin": 4 * quantize.EXACT_TOLERANCE, "images": ties}
    assert report["cpu"]["int8_kernels"] == host()["int8_kernels"]


def test_calibration_reads_training_images_only(tiny_model_dir, tmp_path, monkeypatch):
    seen = []
    real = quantize.quantize_file
    monkeypatch.setattr(
        quantize, "quantize_file", lambda s, o, images, **kw: (seen.append(images), real(s, o, images))
    )
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    write_int8(d, calibration=32, test_limit=200, max_drop=1.0)
    (images,) = seen
    train, _ = load_split("mnist", "train")
    test, _ = load_split("mnist", "test")
    as_bytes = {img.tobytes() for img in train}
    got = [np.rint(img[0] * 255).astype(np.uint8) for img in images]
    assert len(got) == 32 and all(g.tobytes() in as_bytes for g in got)
    assert not {g.tobytes() for g in got} & {t.tobytes() for t in test}
    np.testing.assert_array_equal(images, calibration_images("mnist", 32))  # seeded: the same every run


def test_a_model_that_loses_accuracy_is_refused_and_nothing_is_written(tiny_model_dir, tmp_path, monkeypatch):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    real = quantize._probabilities
    _, y = load_split("mnist", "test")
    wrong = np.eye(10, dtype=np.float32)[(y[:200] + 1) % 10]

    def int8_always_wrong(model, x, *, exact=False):
        return wrong if model.name == INT8_FILE else real(model, x, exact=exact)

    monkeypatch.setattr(quantize, "_probabilities", int8_always_wrong)
    shutil.copy(SHIPPED_MODEL / "model_card.json", d / "model_card.json")  # a real card to extend
    with pytest.raises(QuantizeError, match=r"more than 0.10% below fp32's .* not written"):
        write_int8(d, calibration=32, test_limit=200)
    assert not (d / INT8_FILE).exists()
    # The card says why there is no int8 file, with the figures that refused it.
    q = json.loads((d / "model_card.json").read_text())["int8"]
    assert q["written"] is False and "not written" in q["refused"]
    assert (q["test_accuracy"], q["errors"], q["test_images"]) == (0.0, 200, 200)
    assert q["fp32_test_accuracy"] > 0.05 and "sha256" not in q
    md = (d / "MODEL_CARD.md").read_text()
    assert "## int8 variant: not shipped" in md and "**0.00 %** int8" in md
    assert f"{q['fp32_test_accuracy'] * 100:.2f} % fp32" in md
    # Asked to serve it in int8, the service says the file was refused, not to go and write it.
    from capsnet.service.engine import Engine, EngineError

    with pytest.raises(
        EngineError, match=r"`capsnet quantize` refused to write it \(int8 test accuracy 0.0000%"
    ):
        Engine(d, providers="CPUExecutionProvider", precision="int8")
    with pytest.raises(EngineError, match=r"serve it with CAPSNET_PRECISION=fp32$"):
        Engine(d, providers="CPUExecutionProvider", precision="int8")
    # Where an int8 file from before is there, the card keeps describing that file.
    (d / INT8_FILE).write_bytes(b"an older int8 file")
    card_before = (d / "model_card.json").read_text()
    with pytest.raises(QuantizeError, match="not written"):
        write_int8(d, calibration=32, test_limit=200)
    assert (d / "model_card.json").read_text() == card_before
    assert (d / INT8_FILE).read_bytes() == b"an older int8 file"
    (d / INT8_FILE).unlink()
    # max_drop < -1 demands int8 beat fp32 by more than everything: refused whatever the CPU computes
    monkeypatch.undo()
    with pytest.raises(QuantizeError, match=r"more than .* below fp32's .* not written"):
        write_int8(d, calibration=32, test_limit=200, max_drop=-1.01)
    assert not (d / INT8_FILE).exists()
    with pytest.raises(QuantizeError, match="not found"):
        write_int8(tmp_path / "nowhere")


def test_int8_answers_are_exact_integer_arithmetic_on_this_cpu(int8_dir):
    """7-bit weights: no pair of int8 products saturates 16 bits, so this CPU's kernels compute what
    exact integer sums (VNNI, AMX) compute; the reference runs the file with graph optimizations off,
    each DequantizeLinear feeding an fp32 Conv."""
    d, report = int8_dir
    x = mnist_test_images(64)
    fused = _session(d / INT8_FILE).run(["probabilities"], {"image": x})[0]
    exact = _session(d / INT8_FILE, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(
        ["probabilities"], {"image": x}
    )[0]
    assert np.abs(fused - exact).max() <= quantize.EXACT_TOLERANCE
    assert report["weight_bits"] == 7 and report["max_gap_to_exact_integers"] <= quantize.EXACT_TOLERANCE
    weights = [
        onnx.numpy_helper.to_array(i)
        for i in onnx.load(str(d / INT8_FILE)).graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4
    ]
    assert len(weights) == 2 and all(int(np.abs(w.astype(int)).max()) <= 64 for w in weights)


def test_8_bit_weights_are_refused_where_int8_sums_saturate(tiny_model_dir, tmp_path, monkeypatch):
    """What 7-bit weights prevent: on a CPU without VNNI an 8-bit file's answers leave exact integer
    arithmetic and the gate refuses it; on a VNNI CPU the same file is exact and written."""
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    real = quantize.quantize_file
    monkeypatch.setattr(
        quantize, "quantize_file", lambda s, o, images: real(s, o, images, reduce_range=False)
    )
    if host()["int8_saturates"]:
        with pytest.raises(QuantizeError, match=r"differ from exact integer arithmetic by up to .* saturate"):
            write_int8(d, calibration=64, test_limit=200, max_drop=1.0)
        assert not (d / INT8_FILE).exists()
    else:
        report = write_int8(d, calibration=64, test_limit=200, max_drop=1.0)
        assert report["max_gap_to_exact_integers"] <= quantize.EXACT_TOLERANCE


def test_the_model_card_gets_both_accuracies(tiny_model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    shutil.copy(SHIPPED_MODEL / "model_card.json", d / "model_card.json")  # a real card to extend
    report = write_int8(d, calibration=32, test_limit=200, max_drop=1.0)
    card = json.loads((d / "model_card.json").read_text())
    assert card["int8"] == report and card["evaluation"]["errors"] >= 0  # the rest of the card kept
    md = (d / "MODEL_CARD.md").read_text()
    assert f"**{report['test_accuracy'] * 100:.2f} %** int8 ({report['errors']} errors)" in md
    assert f"{report['fp32_test_accuracy'] * 100:.2f} % fp32" in md and "train split" in md


def test_capsnet_quantize_command_writes_or_refuses_with_a_message(tiny_model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    cmd = [
        sys.executable,
        "-m",
        "capsnet",
        "--log-level",
        "WARNING",
        "quantize",
        str(d),
        "--calibration-images",
        "32",
    ]
    bad = subprocess.run([*cmd, "--max-drop", "-1"], capture_output=True, text=True)
    assert bad.returncode == 1 and "not written" in bad.stderr and "Traceback" not in bad.stderr
    assert not (d / INT8_FILE).exists()
    ok = subprocess.run([*cmd, "--max-drop", "100"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"wrote {d / INT8_FILE}" in ok.stdout and "on 10000 images" in ok.stdout


def test_service_serves_int8_and_metadata_names_the_file(int8_dir, tmp_path):
    """CAPSNET_PRECISION=int8 through the real app (the service-side half of this feature)."""
    from capsnet.service.app import create_app
    from capsnet.service.engine import Engine, EngineError
    from capsnet.service.settings import Settings

    d, _ = int8_dir
    bare = tmp_path / "bare"
    shutil.copytree(d, bare)
    (bare / INT8_FILE).unlink()
    with pytest.raises(
        EngineError, match=r"CAPSNET_PRECISION=int8 needs .*capsnet-int8.onnx: .*`capsnet quantize"
    ):
        Engine(bare, providers="CPUExecutionProvider", precision="int8")
    for precision, file in (("int8", INT8_FILE), ("fp32", "capsnet.onnx")):
        settings = Settings(model_dir=d, providers="CPUExecutionProvider", precision=precision)
        with TestClient(create_app(settings)) as client:
            for _ in range(200):
                if client.get("/health/ready").status_code == 200:
                    break
                time.sleep(0.02)
            meta = client.get("/metadata").json()
            assert meta["precision"] == precision and meta["classifier_file"] == file
            assert meta["onnx_metadata"].get("precision", "fp32") == precision
            png = (SHIPPED_MODEL.parent.parent / "examples" / "7.png").read_bytes()
            r = client.post("/predict", files=[("files", ("7.png", png, "image/png"))])
            assert r.status_code == 200, r.text
            probs = [p["probability"] for p in r.json()["predictions"]]
            assert len(probs) == 1 and 0 <= probs[0] <= 1


AVX2_ONLY = {"model": "AMD EPYC", "present": ["avx2", "fma"], "int8_kernels": "AVX2 (vpmaddubsw, no VNNI)",
             "vnni": False, "int8_saturates": True}  # fmt: skip
VNNI = {"model": "AMD EPYC", "present": ["avx2", "avx512_vnni"], "int8_kernels": "AVX-512 VNNI (vpdpbusd)",
        "vnni": True, "int8_saturates": False}  # fmt: skip


@pytest.mark.parametrize("cpu", [AVX2_ONLY, VNNI], ids=["avx2", "vnni"])
def test_the_service_refuses_8_bit_weights_where_they_saturate_and_says_where_int8_gains_less(
    int8_dir, tmp_path, monkeypatch, caplog, cpu
):
    import capsnet.service.engine
    from capsnet.service.engine import Engine, EngineError

    d, _ = int8_dir
    monkeypatch.setattr(capsnet.service.engine, "host", lambda: cpu)
    eight = tmp_path / "eight-bit"
    shutil.copytree(d, eight)
    # a file from another tool: 8-bit weights and no `weight_bits` in its metadata
    quantize.quantize_file(
        d / "capsnet.onnx", eight / INT8_FILE, calibration_images("mnist", 32), reduce_range=False
    )
    with caplog.at_level("WARNING", logger="capsnet.service.engine"):
        if cpu["int8_saturates"]:
            with pytest.raises(
                EngineError, match=r"8-bit weights, whose int8 sums saturate on this CPU \(AVX2"
            ):
                Engine(eight, providers="CPUExecutionProvider", precision="int8")
        else:
            assert Engine(eight, providers="CPUExecutionProvider", precision="int8").precision == "int8"
        caplog.clear()
        engine = Engine(d, providers="CPUExecutionProvider", precision="int8")  # 7-bit: served anywhere
        assert engine.classifier_file == INT8_FILE
        warned = [r.getMessage() for r in caplog.records if "VNNI" in r.getMessage()]
        assert warned == ([] if cpu["vnni"] else [
            "CAPSNET_PRECISION=int8 on a CPU without VNNI (AVX2 (vpmaddubsw, no VNNI)): answers as on "
            "any CPU, but int8 gains less over fp32 here than on VNNI or AMX CPUs; compare both with "
            "`python -m bench`"
        ])  # fmt: skip
        caplog.clear()
        Engine(d, providers="CPUExecutionProvider", precision="fp32")
        assert not caplog.records  # fp32 has nothing to say about int8
