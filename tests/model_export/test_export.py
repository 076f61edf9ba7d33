import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from capsnet.model_export.export import (
    MODEL_OUTPUTS,
    OPSET,
    PARITY_BATCHES,
    ExportError,
    export,
    graph_control_flow,
)
from tests.checks import assert_right_not_wrong, skip_last_update, transposed
from tests.factories import make_checkpoint, mnist_test_images


@pytest.fixture(scope="module")
def real_images():
    return mnist_test_images(80)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, real_images):
    """The tiny model exported (both graphs through torch.export)."""
    d = tmp_path_factory.mktemp("export")
    model = make_checkpoint(d / "ckpt.pt")
    report = export(d / "ckpt.pt", d / "out", name="tiny", images=real_images)
    assert report["exporter"] == "torch.export" and report["torch"] == torch.__version__
    return model, d / "out", report


def test_graph_is_one_static_graph_and_names_its_io(exported):
    _, out, _ = exported
    proto = onnx.load(str(out / "capsnet.onnx"))
    # the convolutions, then the routing unrolled: no Loop, Scan or If, no subgraph, no local function
    assert graph_control_flow(proto) == [] and not proto.functions
    assert all(not a.HasField("g") and not a.graphs for n in proto.graph.node for a in n.attribute)
    assert [n.op_type for n in proto.graph.node].count("Conv") == 2
    assert proto_opset(out / "capsnet.onnx") == OPSET
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


@pytest.mark.parametrize("B", [1, 5, 33])
def test_dynamic_batch_and_parity(exported, real_images, B):
    model, out, _ = exported
    sess = ort.InferenceSession(str(out / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    x = real_images[:B]
    probs, poses, coupling, primary = sess.run(None, {"image": x})
    with torch.inference_mode():
        ref = [t.numpy() for t in model.run(torch.from_numpy(x))]
    assert probs.shape == (B, 10) and coupling.shape == (B, 3, 144, 10)
    assert primary.shape == (B, 144) and primary.min() >= 0 and primary.max() < 1
    for got, want in zip((probs, poses, coupling, primary), ref, strict=True):  # values of 0.02 to 0.9
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-5)
    np.testing.assert_allclose(coupling.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(poses, axis=-1), probs, atol=1e-6)
    dec = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    mask = np.eye(10, dtype=np.float32)[probs.argmax(1)]
    (rec,) = dec.run(None, {"poses": poses, "mask": mask})
    with torch.inference_mode():
        rec_ref = model.reconstruct(torch.from_numpy(poses), torch.from_numpy(probs.argmax(1))).numpy()
    np.testing.assert_allclose(rec, rec_ref, atol=1e-5, rtol=0)


def test_report_parity_and_metadata_readable_without_torch(exported, real_images):
    model, out, report = exported
    assert report["parity_batches"] == [1, 7, 64] == list(PARITY_BATCHES)
    # The reported differences are the ones measured: recomputed here on the same slices of the images.
    sess = ort.InferenceSession(str(out / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    worst = dict.fromkeys(MODEL_OUTPUTS, 0.0)
    start = 0
    for B in PARITY_BATCHES:
        x = real_images[start : start + B]
        start += B
        with torch.inference_mode():
            ref = [t.numpy() for t in model.run(torch.from_numpy(x))]
        for name, got, want in zip(
            MODEL_OUTPUTS, sess.run(list(MODEL_OUTPUTS), {"image": x}), ref, strict=True
        ):
            worst[name] = max(worst[name], float(np.abs(got - want).max()))
    for name, value in worst.items():
        assert report["parity_max_abs_diff"][name] == pytest.approx(value, rel=0.5, abs=1e-7), name
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
    assert meta["preprocess"] == "mnist"  # the dataset's: the service's default preprocessing for the model
    assert (
        meta["opset"] == str(proto_opset(out / "capsnet.onnx")) == str(OPSET) == report["metadata"]["opset"]
    )
    dec = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert dec.get_modelmeta().custom_metadata_map == meta  # one exporter, one opset for both files
    assert proto_opset(out / "decoder.onnx") == OPSET


def proto_opset(path):
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("r", [1, 5])
def test_routing_iterations_are_visible_in_the_graph(tmp_path, real_images, r):
    make_checkpoint(tmp_path / "ckpt.pt", r=r)
    export(tmp_path / "ckpt.pt", tmp_path / "out", images=real_images, batches=(1, 7))
    proto = onnx.load(str(tmp_path / "out" / "capsnet.onnx"))
    assert graph_control_flow(proto) == []
    # one c_i = softmax(b_i) per routing iteration after the first, whose c is softmax(0) = 1/J
    assert sum(n.op_type == "Exp" for n in proto.graph.node) == r - 1
    assert "Softmax" not in [n.op_type for n in proto.graph.node]  # written out over the parents
    sess = ort.InferenceSession(str(tmp_path / "out" / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(["coupling"], {"image": real_images[:2]})[0].shape == (2, r, 144, 10)


def node_outputs_per_image(path: Path, batch: int, tmp: Path) -> dict[str, int]:
    """Elements per image of every node's output, as onnxruntime ran the graph (from its profile)."""
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / "profile")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"image": np.zeros((batch, 1, 28, 28), np.float32)})
    sizes = {}
    for event in json.loads(Path(sess.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            for shapes in event["args"]["output_type_shape"]:
                (dims,) = shapes.values()
                sizes[event["name"]] = max(sizes.get(event["name"], 0), int(np.prod(dims)) // batch)
    return sizes


@pytest.mark.parametrize("B", [1, 5])
def test_every_batch_routes_without_forming_the_votes(exported, tmp_path, B):
    """No node outputs û, B x N x J x D floats (the training einsum did), at any batch size: the largest
    tensor per image is c * u, J x K x N (capsules.route_without_votes). W is stored once, under its
    parameter's name."""
    model, out, _ = exported
    cfg = model.config
    N, J, D, K = cfg.num_primary, cfg.num_classes, cfg.digit_dim, cfg.primary_dim
    proto = onnx.load(str(out / "capsnet.onnx"))
    assert "Einsum" not in [n.op_type for n in proto.graph.node]
    sizes = node_outputs_per_image(out / "capsnet.onnx", B, tmp_path)
    assert len(sizes) > 20 and N * J * D not in sizes.values()
    assert max(sizes.values()) == J * K * N < N * J * D
    weights = [i.name for i in proto.graph.initializer if int(np.prod(i.dims)) == model.digits.W.numel()]
    assert weights == ["model.digits.W"]


def test_weights_come_back_from_the_files(exported):
    """`capsnet train --init-from` reads the weights back by initializer name."""
    from capsnet.model_export.train import weights_from_export

    model, out, _ = exported
    weights, meta = weights_from_export(out)
    state = model.state_dict()
    assert sorted(weights) == sorted(state) and meta["name"] == "tiny"
    for k, v in state.items():
        assert torch.equal(weights[k], v), k


def test_cli_exports_with_torch_export_only(tmp_path, monkeypatch, capsys):
    import capsnet.model_export.export as ex
    from capsnet.cli import main

    seen = []

    def fake_export(checkpoint, output, *, name):
        seen.append((checkpoint, name))
        return {"parity_max_abs_diff": {}, "metadata": {}}

    monkeypatch.setattr(ex, "export", fake_export)
    main(["export", "ckpt.pt", "--output", str(tmp_path / "out"), "--no-card"])
    assert seen == [(Path("ckpt.pt"), "capsnet-mnist")]
    with pytest.raises(SystemExit):  # the TorchScript choice is gone
        main(["export", "ckpt.pt", "--no-card", "--exporter", "torchscript"])
    assert "unrecognized arguments: --exporter" in capsys.readouterr().err


def test_control_flow_in_the_classifier_fails_the_export(tmp_path, real_images, monkeypatch):
    """A classifier recorded with a branch (here torch.cond, exported as an If) is refused: the file
    must be one static graph."""
    import capsnet.model_export.export as ex

    class Branchy(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, image):
            def run(x):
                return tuple(self.model.run(x))

            return torch.cond(image.sum() > 0, run, run, (image,))

    make_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setattr(ex, "_ClassifierGraph", Branchy)
    with pytest.raises(ExportError, match=r"control flow \['If'\]"):
        export(tmp_path / "ckpt.pt", tmp_path / "out", images=real_images)
    assert not (tmp_path / "out").exists()


def test_a_dead_capsule_squashes_to_zero_through_the_eps(tmp_path, real_images):
    """A primary capsule type whose weights are all zero gives zero vectors: squash(0) is 0 only through
    the eps inside its square root (0 / 0 without), which the file must keep."""
    make_checkpoint(tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    dim = state["config"]["primary_dim"]
    state["model"]["primary.conv.weight"][:dim] = 0.0  # type 0: channels 0 .. dim - 1
    state["model"]["primary.conv.bias"][:dim] = 0.0
    torch.save(state, tmp_path / "dead.pt")
    export(tmp_path / "dead.pt", tmp_path / "out", images=real_images, batches=(1, 7))  # parity holds
    sess = ort.InferenceSession(str(tmp_path / "out" / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    outputs = sess.run(None, {"image": real_images[:4]})
    assert all(np.isfinite(o).all() for o in outputs)
    grid = 6 * 6
    assert (outputs[3][:, :grid] == 0).all() and (outputs[3][:, grid:] > 0).all()  # primary_activations


def test_w_folded_or_renamed_fails_the_export(exported):
    """`train.weights_from_export` needs every parameter under its name, and W once: a layout of it
    folded into the file would be one more copy."""
    from capsnet.model_export.export import _check_weights

    model, out, _ = exported
    classifier = onnx.load(str(out / "capsnet.onnx"))
    decoder = onnx.load(str(out / "decoder.onnx"))
    _check_weights(classifier, decoder, model)  # the export as written passes
    (w,) = (i for i in classifier.graph.initializer if i.name == "model.digits.W")
    folded = onnx.ModelProto()
    folded.CopyFrom(classifier)
    copy = folded.graph.initializer.add()
    copy.CopyFrom(w)
    copy.name = "val_w_transposed"
    with pytest.raises(ExportError, match="stored as"):
        _check_weights(folded, decoder, model)
    w.name = "val_0"
    with pytest.raises(ExportError, match=r"not stored under their names.*model\.digits\.W"):
        _check_weights(classifier, decoder, model)
    decoder.graph.initializer[0].name = "val_1"
    with pytest.raises(ExportError, match=r"decoder\.layers"):
        _check_weights(onnx.load(str(out / "capsnet.onnx")), decoder, model)


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
    import capsnet.model_export.export as ex

    make_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setattr(ex, "PARITY_ATOL", 0.0)  # any float difference now fails
    with pytest.raises(ExportError, match="parity failed"):
        ex.export(tmp_path / "ckpt.pt", tmp_path / "out", images=real_images)
    assert not (tmp_path / "out").exists()


def numpy_routing(u_hat: np.ndarray, r: int, updates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Procedure 1 of the paper in float64 numpy: u_hat (B, J, N, D) -> v (B, J, D), c (B, r, N, J).
    `updates` < r - 1 leaves out the last updates of b: the bug to catch."""
    B, J, N, _ = u_hat.shape
    b = np.zeros((B, N, J))
    cs = []
    for it in range(r):
        e = np.exp(b - b.max(axis=2, keepdims=True))
        c = e / e.sum(axis=2, keepdims=True)  # softmax over the parents j
        cs.append(c)
        s = np.einsum("bnj,bjnd->bjd", c, u_hat)
        n2 = (s * s).sum(axis=-1, keepdims=True)
        v = s * n2 / ((1 + n2) * np.sqrt(n2))
        if it < (r - 1 if updates is None else updates):
            b = b + np.einsum("bjnd,bjd->bnj", u_hat, v)
    return v, np.stack(cs, axis=1)


def test_exported_routing_equals_numpy_routing(exported, real_images):
    """The ONNX graph's routing against the algorithm written here, from the model's own votes û_j|i:
    a graph (and a PyTorch model, which parity would not tell apart) that skipped the last routing
    update, reversed the iterations or transposed the coupling fails."""
    model, out, _ = exported
    x = real_images[:16]
    with torch.inference_mode():
        u = model.primary(torch.relu(model.conv1(torch.from_numpy(x)))).double().numpy()  # (B, N, 8)
    W = model.digits.W.detach().double().numpy()  # (N, J, 16, 8)
    u_hat = np.einsum("njdk,bnk->bjnd", W, u)  # (B, J, N, 16)
    v, c = numpy_routing(u_hat, 3)
    sess = ort.InferenceSession(str(out / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    probs, poses, coupling, primary = sess.run(None, {"image": x})
    v_skip, c_skip = numpy_routing(u_hat, 3, updates=1)
    assert np.abs(c[:, 2] - c[:, 1]).max() > 0.05  # the routing has work to do on this model
    # float32 in the graph against float64 here: rtol 1e-4 (measured differences: about 1e-6)
    assert_right_not_wrong(primary, np.linalg.norm(u, axis=-1), {}, rtol=1e-4)
    wrong_c = {
        "the last update skipped": c_skip,
        "iterations reversed": c[:, ::-1],
        "transposed": transposed(c),
    }
    assert_right_not_wrong(coupling, c, wrong_c, rtol=1e-4)
    np.testing.assert_array_equal(skip_last_update(c, axis=1), c_skip)  # what the trace tests assume
    assert_right_not_wrong(poses, v, {"the last update skipped": v_skip}, rtol=1e-4)
    assert_right_not_wrong(
        probs,
        np.linalg.norm(v, axis=-1),
        {"the last update skipped": np.linalg.norm(v_skip, axis=-1)},
        rtol=1e-4,
    )


@pytest.mark.parametrize("file", ["capsnet.onnx", "capsnet-int8.onnx"])
def test_the_shipped_files_are_one_static_graph(real_images, file):
    """The shipped classifier (fp32 and int8) is what the export writes today: no control flow, so
    TensorRT and CUDA graphs take it as it is, and real digits get a confident class at any batch size."""
    from capsnet.service.settings import SHIPPED_MODEL

    proto = onnx.load(str(SHIPPED_MODEL / file))
    assert graph_control_flow(proto) == []
    if file == "capsnet.onnx":
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["opset"] == str(proto_opset(SHIPPED_MODEL / file)) == str(OPSET)
    sess = ort.InferenceSession(str(SHIPPED_MODEL / file), providers=["CPUExecutionProvider"])
    alone = sess.run(None, {"image": real_images[:1]})
    batch = sess.run(None, {"image": real_images[:5]})
    for name, a, b in zip(MODEL_OUTPUTS, alone, batch, strict=True):
        np.testing.assert_allclose(a, b[:1], rtol=0, atol=2e-6 * np.abs(b).max(), err_msg=name)
    assert batch[0].max(1).min() > 0.5  # real digits: a confident class each, not zeros
