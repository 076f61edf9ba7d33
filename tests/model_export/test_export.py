import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model_export.export import ExportError, export, graph_control_flow
from tests.factories import make_checkpoint, mnist_test_images


@pytest.fixture(scope="module")
def real_images():
    return mnist_test_images(80)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, real_images):
    d = tmp_path_factory.mktemp("export")
    model = make_checkpoint(d / "ckpt.pt")
    report = export(d / "ckpt.pt", d / "out", name="tiny", images=real_images)
    return model, d / "out", report


def test_graph_has_no_control_flow_and_named_io(exported):
    _, out, _ = exported
    proto = onnx.load(str(out / "capsnet.onnx"))
    assert graph_control_flow(proto) == []
    assert proto.opset_import[0].version >= 17
    sess = ort.InferenceSession(str(out / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "image" and inp.type == "tensor(float)"
    assert inp.shape[0] not in (1, 2) and isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 28, 28]
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert list(outs) == ["probabilities", "poses", "coupling", "primary_activations"]
    assert outs["primary_activations"][1:] == [144]
    assert outs["probabilities"][1:] == [10] and outs["poses"][1:] == [10, 16]
    assert outs["coupling"][1:] == [3, 144, 10]
    dec = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in dec.get_inputs()] == ["poses", "mask"]
    assert [o.name for o in dec.get_outputs()] == ["reconstruction"]


@pytest.mark.parametrize("B", [1, 33])
def test_dynamic_batch_and_parity(exported, real_images, B):
    model, out, _ = exported
    sess = ort.InferenceSession(str(out / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    x = real_images[:B]
    probs, poses, coupling, primary = sess.run(None, {"image": x})
    with torch.inference_mode():
        ref = [t.numpy() for t in model.run(torch.from_numpy(x))]
    assert probs.shape == (B, 10) and coupling.shape == (B, 3, 144, 10)
    assert primary.shape == (B, 144) and primary.min() >= 0 and primary.max() < 1
    for got, want in zip((probs, poses, coupling, primary), ref, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(coupling.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(poses, axis=-1), probs, atol=1e-6)
    dec = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    mask = np.eye(10, dtype=np.float32)[probs.argmax(1)]
    (rec,) = dec.run(None, {"poses": poses, "mask": mask})
    with torch.inference_mode():
        rec_ref = model.reconstruct(torch.from_numpy(poses), torch.from_numpy(probs.argmax(1))).numpy()
    np.testing.assert_allclose(rec, rec_ref, atol=1e-5, rtol=0)


def test_report_parity_and_metadata_readable_without_torch(exported):
    _, out, report = exported
    assert report["parity_batches"] == [1, 7, 64]
    assert all(v <= 1e-5 for v in report["parity_max_abs_diff"].values())
    sess = ort.InferenceSession(str(out / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == [str(i) for i in range(10)]
    assert meta["routing_iterations"] == "3" and meta["name"] == "tiny"
    assert json.loads(meta["config"])["primary_types"] == 4
    assert json.loads(meta["primary_capsules"]) == {
        "count": 144,
        "types": 4,
        "grid": [6, 6],
        "order": ["type", "row", "col"],
    }
    assert float(meta["test_accuracy"]) == 0.5 and len(meta["checkpoint_sha256"]) == 64
    assert meta["dataset"] == "mnist" and meta["exported_at"].endswith("Z")


@pytest.mark.parametrize("r", [1, 5])
def test_routing_iterations_are_visible_in_the_graph(tmp_path, real_images, r):
    make_checkpoint(tmp_path / "ckpt.pt", r=r)
    export(tmp_path / "ckpt.pt", tmp_path / "out", images=real_images, batches=(1, 7))
    proto = onnx.load(str(tmp_path / "out" / "capsnet.onnx"))
    assert graph_control_flow(proto) == []
    softmaxes = sum(n.op_type == "Softmax" for n in proto.graph.node)
    assert softmaxes == r  # one c_i = softmax(b_i) per routing iteration, r = 3 gives 3
    sess = ort.InferenceSession(str(tmp_path / "out" / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(["coupling"], {"image": real_images[:2]})[0].shape == (2, r, 144, 10)


def test_default_r_has_three_softmaxes(exported):
    _, out, _ = exported
    proto = onnx.load(str(out / "capsnet.onnx"))
    assert sum(n.op_type == "Softmax" for n in proto.graph.node) == 3


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path, real_images):
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        export(tmp_path / "junk.pt", tmp_path / "out", images=real_images)
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a capsnet-checkpoint"):
        export(tmp_path / "foreign.pt", tmp_path / "out", images=real_images)
    make_checkpoint(tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state["config"]["primary_types"] = 8  # weights no longer fit the config
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="do not match its config"):
        export(tmp_path / "mismatch.pt", tmp_path / "out", images=real_images)
    assert not (tmp_path / "out").exists()


def test_parity_failure_writes_nothing(tmp_path, real_images, monkeypatch):
    import model_export.export as ex

    make_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setattr(ex, "PARITY_ATOL", 0.0)  # any float difference now fails
    with pytest.raises(ExportError, match="parity failed"):
        ex.export(tmp_path / "ckpt.pt", tmp_path / "out", images=real_images)
    assert not (tmp_path / "out").exists()
