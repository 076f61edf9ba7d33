"""Two models side by side on the REST endpoints: the shipped MNIST model (the default) and a tiny one
exported as a Fashion-MNIST model (its class names, `preprocess=fashion` in its metadata), each asked for
by `?model=`; checked on the numbers against onnxruntime run on the files themselves."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from capsnet.model_export.data import DATASETS
from capsnet.service.engine import Engine, EngineError
from capsnet.service.preprocess import preprocess_bytes
from capsnet.service.settings import SHIPPED_MODEL, Settings
from tests.checks import sample
from tests.live import ready_client
from tests.service.photos import render_product

MNIST, FASHION = "capsnet-mnist", "tiny-fashion"
DIGITS, CLOTHES = [str(d) for d in range(10)], list(DATASETS["fashion-mnist"].labels)
OUTPUTS = ["probabilities", "poses", "coupling", "primary_activations"]
ENDPOINTS = ["/predict", "/routing-trace", "/reconstruct", "/perturb"]
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def client(tiny_fashion_model_dir):
    settings = Settings(model_dir=SHIPPED_MODEL, model_dirs=str(tiny_fashion_model_dir), max_batch_size=8,
                        model_control="explicit", admin_key="adm1n")  # fmt: skip
    with ready_client(settings) as c:  # both models warm
        yield c


@pytest.fixture(scope="module")
def files(tiny_fashion_model_dir):
    """onnxruntime on the ONNX files themselves: the two classifiers by name, and the fashion decoder."""

    def session(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    return {
        MNIST: session(SHIPPED_MODEL / "capsnet.onnx"),
        FASHION: session(tiny_fashion_model_dir / "capsnet.onnx"),
        "decoder": session(tiny_fashion_model_dir / "decoder.onnx"),
    }


@pytest.fixture(scope="module")
def photo() -> bytes:
    return render_product(np.random.default_rng(3), fmt="JPEG")  # trousers on a light background


def run(session, image: np.ndarray) -> dict[str, np.ndarray]:
    """The classifier's outputs for one (28, 28) image, batch axis dropped."""
    out = session.run(OUTPUTS, {"image": image[None, None].astype(np.float32)})
    return {name: value[0] for name, value in zip(OUTPUTS, out, strict=True)}


def decode(files, poses: np.ndarray, k: int) -> np.ndarray:
    mask = np.eye(10, dtype=np.float32)[[k]]
    return files["decoder"].run(["reconstruction"], {"poses": poses[None], "mask": mask})[0][0, 0]


def as_input(photo: bytes, mode: str) -> np.ndarray:
    return preprocess_bytes(photo, mode=mode, max_pixels=10**7)  # type: ignore[arg-type]


def close(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=1e-6)


def version_of(session) -> str:
    return session.get_modelmeta().custom_metadata_map["version"]


def test_metadata_lists_both_models_and_answers_for_each(client, files):
    m = client.get("/metadata").json()
    assert (m["name"], m["version"], m["labels"]) == (MNIST, version_of(files[MNIST]), DIGITS)
    assert m["preprocess"] == "mnist" and "preprocess" not in m["onnx_metadata"]  # exported before the key
    assert m["models"] == [
        {"name": MNIST, "version": version_of(files[MNIST]), "labels": DIGITS, "preprocess": "mnist",
         "routing_iterations": 3, "decoder": True, "default": True, "ready": True},
        {"name": FASHION, "version": version_of(files[FASHION]), "labels": CLOTHES, "preprocess": "fashion",
         "routing_iterations": 3, "decoder": True, "default": False, "ready": True},
    ]  # fmt: skip
    assert client.get("/metadata", params={"model": MNIST}).json() == m  # the default, by its name

    f = client.get("/metadata", params={"model": FASHION}).json()
    assert (f["name"], f["version"], f["labels"]) == (FASHION, version_of(files[FASHION]), CLOTHES)
    assert f["preprocess"] == f["onnx_metadata"]["preprocess"] == "fashion"
    assert f["primary_capsules"]["count"] == 144 and f["primary_capsules"]["types"] == 4
    assert f["onnx_metadata"]["dataset"] == "fashion-mnist" and f["models"] == m["models"]
    assert set(f) == set(m)


def test_predict_asks_the_named_model_with_its_own_default_preprocessing(client, files, photo):
    fashion_x, mnist_x = as_input(photo, "fashion"), as_input(photo, "mnist")
    assert not np.allclose(fashion_x, mnist_x, atol=0.1)  # the two procedures really differ here
    want = run(files[FASHION], fashion_x)

    r = client.post("/predict", params={"model": FASHION}, content=photo, headers=JPEG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": FASHION, "version": version_of(files[FASHION])}
    (item,) = body["predictions"]
    k = int(want["probabilities"].argmax())
    assert item["class_index"] == k and item["label"] == CLOTHES[k]
    close(item["probabilities"], want["probabilities"])
    close(item["poses"], want["poses"])
    assert item["probability"] == pytest.approx(float(want["probabilities"][k]), abs=1e-6)

    # no `preprocess`: the model's default, which is `fashion`; `mnist` is another input
    explicit = client.post("/predict", params={"model": FASHION, "preprocess": "fashion"}, content=photo,
                           headers=JPEG)  # fmt: skip
    assert explicit.content == r.content
    digit_form = client.post("/predict", params={"model": FASHION, "preprocess": "mnist"}, content=photo,
                             headers=JPEG)  # fmt: skip
    assert digit_form.status_code == 200 and digit_form.content != r.content
    close(digit_form.json()["predictions"][0]["probabilities"], run(files[FASHION], mnist_x)["probabilities"])

    # without `model`: the default model, with its default `mnist`, as before
    default = client.post("/predict", content=photo, headers=JPEG)
    assert default.status_code == 200 and default.json()["model"]["name"] == MNIST
    close(default.json()["predictions"][0]["probabilities"], run(files[MNIST], mnist_x)["probabilities"])
    assert client.post("/predict", params={"model": MNIST}, content=photo, headers=JPEG).content == (
        default.content
    )
    fashion_on_mnist = client.post("/predict", params={"preprocess": "fashion"}, content=photo, headers=JPEG)
    close(fashion_on_mnist.json()["predictions"][0]["probabilities"],
          run(files[MNIST], fashion_x)["probabilities"])  # fmt: skip


def test_routing_trace_reconstruct_and_perturb_take_the_model_too(client, files, photo):
    x = as_input(photo, "fashion")
    want = run(files[FASHION], x)
    k = int(want["probabilities"].argmax())

    t = client.post("/routing-trace", params={"model": FASHION}, content=photo, headers=JPEG).json()
    assert t["model"]["name"] == FASHION and t["classes"] == CLOTHES and t["label"] == CLOTHES[k]
    assert np.shape(t["coupling"]) == (3, 144, 10) and t["primary_capsules"]["count"] == 144
    close(t["coupling"], want["coupling"])
    close(t["primary_activations"], want["primary_activations"])
    close(t["probabilities"], want["probabilities"])
    digits = client.post("/routing-trace", params={"model": MNIST, "iterations": "last"}, content=photo,
                         headers=JPEG).json()  # fmt: skip
    assert digits["classes"] == DIGITS and np.shape(digits["coupling"]) == (1, 1152, 10)
    heatmap = client.post("/routing-trace", params={"model": FASHION, "format": "png"}, content=photo,
                          headers=JPEG)  # fmt: skip
    assert heatmap.status_code == 200 and heatmap.headers["content-type"] == "image/png"

    rec = client.post("/reconstruct", params={"model": FASHION}, content=photo, headers=JPEG).json()
    assert rec["class_index"] == k and rec["label"] == CLOTHES[k]
    close(rec["poses"], want["poses"])
    close(rec["reconstruction"], decode(files, want["poses"], k))
    edited = want["poses"].copy()
    edited[3, 0] += 0.2
    rec = client.post("/reconstruct", params={"model": FASHION, "class_index": 3},
                      json={"poses": edited.tolist()}).json()  # fmt: skip
    assert rec["label"] == "Dress"
    close(rec["reconstruction"], decode(files, edited, 3))

    sweep = client.post("/perturb", params={"model": FASHION, "dims": "0,5", "low": -0.1, "high": 0.1,
                                            "step": 0.1}, content=photo, headers=JPEG).json()  # fmt: skip
    assert sweep["label"] == CLOTHES[k] and sweep["dims"] == [0, 5]
    close(sweep["values"], [-0.1, 0.0, 0.1])
    assert np.shape(sweep["reconstructions"]) == (2, 3, 28, 28)
    moved = want["poses"].copy()
    moved[k, 5] += np.float32(0.1)
    close(sweep["reconstructions"][1][2], decode(files, moved, k))


def test_an_unknown_model_is_a_404_naming_the_models_served(client, photo, caplog):
    caplog.set_level(logging.INFO)
    detail = "unknown model 'nope'; this server has ['capsnet-mnist', 'tiny-fashion']"
    for path in ENDPOINTS:
        r = client.post(path, params={"model": "nope"}, content=photo, headers=JPEG)
        assert (r.status_code, r.json()) == (404, {"detail": detail}), path
    r = client.get("/metadata", params={"model": "nope"})
    assert (r.status_code, r.json()) == (404, {"detail": detail})
    r = client.post("/v2/models/nope/infer", json={})  # the v2 paths say the same, their way
    assert (r.status_code, r.json()) == (404, {"error": detail})
    assert [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR] == []


def test_metrics_count_each_inference_under_the_chosen_model(client, photo):
    def batches(model: str) -> float:
        return sample(client.get("/metrics").text, f'capsnet_batch_images_count{{model="{model}"}}')

    before = {name: batches(name) for name in (MNIST, FASHION)}
    for params in ({"model": FASHION}, {"model": FASHION, "unused": "1"}):  # the fast lane, then FastAPI
        assert client.post("/predict", params=params, content=photo, headers=JPEG).status_code == 200
    assert client.post("/routing-trace", params={"model": FASHION}, content=photo, headers=JPEG).is_success
    assert batches(FASHION) == before[FASHION] + 3 and batches(MNIST) == before[MNIST]


def test_the_openapi_document_describes_model_and_preprocess(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in [*((p, "post") for p in ENDPOINTS), ("/metadata", "get")]:
        op = paths[path][method]
        params = {p["name"]: p for p in op["parameters"]}
        assert params["model"]["in"] == "query" and not params["model"].get("required", False), path
        assert "404" in op["responses"], path
    described = paths["/predict"]["post"]["parameters"]
    preprocess = next(p for p in described if p["name"] == "preprocess")
    modes = next(s["enum"] for s in preprocess["schema"]["anyOf"] if "enum" in s)
    assert modes == ["mnist", "fashion", "none"]
    assert all(f"`{m}`" in preprocess["description"] for m in modes)


def test_a_model_naming_an_unknown_preprocessing_is_refused(tiny_model_dir, tmp_path):
    copy = tmp_path / "sketchy"
    shutil.copytree(tiny_model_dir, copy)
    proto = onnx.load(str(copy / "capsnet.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props} | {"preprocess": "sketch"}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(copy / "capsnet.onnx"))
    with pytest.raises(EngineError, match="unknown preprocessing 'sketch'"):
        Engine(copy, providers="CPUExecutionProvider")
    assert Engine(tiny_model_dir, providers="CPUExecutionProvider").info.preprocess == "mnist"


def test_an_unloaded_model_answers_503_as_on_the_v2_paths(client, photo):
    """(Last in the module: it unloads the fashion model, and loads it again.)"""
    admin = {"Authorization": "Bearer adm1n"}
    assert client.post(f"/v2/repository/models/{FASHION}/unload", headers=admin).status_code == 200
    try:
        v2 = client.post(f"/v2/models/{FASHION}/infer", json={})
        assert v2.status_code == 503 and "is not loaded (unloaded)" in v2.json()["error"]
        for path in ENDPOINTS:
            r = client.post(path, params={"model": FASHION}, content=photo, headers=JPEG)
            assert (r.status_code, r.json()) == (503, {"detail": v2.json()["error"]}), path
        assert client.get("/metadata", params={"model": FASHION}).status_code == 503
        assert [e["name"] for e in client.get("/metadata").json()["models"]] == [MNIST]  # not served now
        assert client.post("/predict", content=photo, headers=JPEG).status_code == 200  # the default is
    finally:
        assert client.post(f"/v2/repository/models/{FASHION}/load", headers=admin).status_code == 200
    assert client.post("/predict", params={"model": FASHION}, content=photo, headers=JPEG).status_code == 200


def test_the_defaults_serve_every_shipped_model_the_shipped_default_first(
    tmp_path, monkeypatch, tiny_model_dir, tiny_fashion_model_dir, files, photo
):
    """CAPSNET_MODEL_DIRS unset: a server of the shipped model serves the other shipped models beside it
    (#33: `make serve`, the wheel); set, even empty, it is the operator's list; beside a model of the
    operator's, nothing shipped is added."""
    from capsnet.service import settings as settings_module
    from capsnet.service.state import model_dirs

    shipped = tmp_path / "models"  # the package capsnet.models, as a wheel installs it
    shutil.copytree(tiny_model_dir, shipped / "capsnet-mnist")
    shutil.copytree(tiny_fashion_model_dir, shipped / "capsnet-fashion-mnist")
    (shipped / "__pycache__").mkdir()  # a folder without capsnet.onnx is no model
    monkeypatch.setattr(settings_module, "SHIPPED_MODEL", shipped / "capsnet-mnist")
    default = Settings(model_dir=shipped / "capsnet-mnist", max_batch_size=8)
    assert model_dirs(default) == [shipped / "capsnet-mnist", shipped / "capsnet-fashion-mnist"]
    assert model_dirs(Settings(model_dir=shipped / "capsnet-mnist", model_dirs="")) == [
        shipped / "capsnet-mnist"
    ]
    assert model_dirs(Settings(model_dir=tiny_model_dir)) == [tiny_model_dir]
    named = Settings(model_dir=shipped / "capsnet-mnist", model_dirs=str(tiny_fashion_model_dir))
    assert model_dirs(named) == [shipped / "capsnet-mnist", tiny_fashion_model_dir]

    with ready_client(default) as c:
        models = c.get("/metadata").json()["models"]
        assert [(m["name"], m["default"], m["ready"]) for m in models] == [
            ("tiny", True, True),
            (FASHION, False, True),
        ]
        r = c.post("/predict", params={"model": FASHION}, content=photo, headers=JPEG)
        assert r.status_code == 200, r.text
        want = run(files[FASHION], as_input(photo, "fashion"))  # the shipped copy's numbers are its own
        close(r.json()["predictions"][0]["probabilities"], want["probabilities"])
