"""Open Inference Protocol (v2) endpoints, called with the real tritonclient over real HTTP (uvicorn),
serving two real models by name: the shipped one (the default, behind /predict) and the tiny one."""

import gzip
import shutil
import time

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from capsnet.service.app import create_app
from capsnet.service.engine import EngineError
from capsnet.service.settings import SHIPPED_MODEL, Settings
from tests import live
from tests.checks import assert_right_not_wrong, transposed

OUTPUTS = ["probabilities", "poses", "coupling", "primary_activations"]


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    settings = Settings(model_dir=SHIPPED_MODEL, model_dirs=str(tiny_model_dir), max_batch_size=8,
                        max_upload_bytes=1_000_000)  # fmt: skip
    with live.serve(settings) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    c = httpclient.InferenceServerClient(url=url)
    yield c
    c.close()


def direct(session, x):
    return dict(zip(OUTPUTS, session.run(OUTPUTS, {"image": x}), strict=True))


def image_input(x, binary):
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def close(a, b, name=""):
    """Equal within rtol 1e-5 of the values' scale; for the coupling, also proof that this tolerance
    rejects the coupling transposed (its (N, J) memory written as (J, N)) or its iterations reversed."""
    b = np.asarray(b)
    wrong = {"transposed": transposed(b), "iterations reversed": b[:, ::-1]} if name == "coupling" else {}
    assert_right_not_wrong(a, b, wrong)


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["capsnet-mnist", "tiny"])
def test_metadata_matches_the_onnx_file(client, sessions, name):
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "capsnet-service" and "binary_tensor_data" in server["extensions"]

    sess = sessions[name]
    version = sess.get_modelmeta().custom_metadata_map["version"]
    meta = client.get_model_metadata(name)
    assert meta["name"] == name and meta["versions"] == [version]
    assert meta["platform"] == "onnxruntime_onnx"

    def expected(args):
        return [
            {"name": a.name, "datatype": "FP32", "shape": [-1 if isinstance(d, str) else d for d in a.shape]}
            for a in args
        ]

    assert meta["inputs"] == expected(sess.get_inputs())
    assert meta["outputs"] == expected(sess.get_outputs())
    assert [o["name"] for o in meta["outputs"]] == OUTPUTS
    assert client.get_model_metadata(name, model_version=version) == meta
    assert client.is_model_ready(name) and client.is_model_ready(name, model_version=version)
    assert not client.is_model_ready(name, model_version="no-such-version")
    assert not client.is_model_ready("no-such-model")


def test_the_two_models_have_their_own_sizes(client):
    coupling = {
        name: next(o["shape"] for o in client.get_model_metadata(name)["outputs"] if o["name"] == "coupling")
        for name in ("capsnet-mnist", "tiny")
    }
    assert coupling == {"capsnet-mnist": [-1, 3, 1152, 10], "tiny": [-1, 3, 144, 10]}


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_infer_json_and_binary_equal_onnxruntime(client, sessions, images, binary_in, binary_out):
    x = images[:3]
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in OUTPUTS]
    result = client.infer("tiny", [image_input(x, binary_in)], outputs=outputs, request_id="r-1")
    response = result.get_response()
    assert response["model_name"] == "tiny" and response["id"] == "r-1"
    assert [o["name"] for o in response["outputs"]] == OUTPUTS
    for o in response["outputs"]:
        assert ("binary_data_size" in o.get("parameters", {})) == binary_out
        assert ("data" in o) == (not binary_out)
    ref = direct(sessions["tiny"], x)
    for n in OUTPUTS:
        got = result.as_numpy(n)
        assert got.dtype == np.float32 and got.shape == ref[n].shape
        close(got, ref[n], n)


def test_requested_outputs_subset_and_mixed_encodings(client, sessions, images):
    x = images[:2]
    outputs = [
        httpclient.InferRequestedOutput("coupling", binary_data=True),
        httpclient.InferRequestedOutput("probabilities", binary_data=False),
    ]
    result = client.infer("tiny", [image_input(x, True)], outputs=outputs)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["coupling", "probabilities"]
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 2 * 3 * 144 * 10 * 4
    assert len(response["outputs"][1]["data"]) == 2 * 10
    assert result.as_numpy("poses") is None
    ref = direct(sessions["tiny"], x)
    close(result.as_numpy("coupling"), ref["coupling"], "coupling")
    close(result.as_numpy("probabilities"), ref["probabilities"])

    # no `outputs`: tritonclient asks for every output in binary (parameters.binary_data_output)
    result = client.infer("tiny", [image_input(x, False)])
    for n in OUTPUTS:
        close(result.as_numpy(n), ref[n], n)
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_v2_gives_the_numbers_of_predict(client, url, sessions, images):
    x = images[:4]
    predict = httpx.post(f"http://{url}/predict", json={"images": x[:, 0].tolist()}).json()
    assert predict["model"]["name"] == "capsnet-mnist"  # /predict serves the default model
    result = client.infer("capsnet-mnist", [image_input(x, True)])
    probs, poses = result.as_numpy("probabilities"), result.as_numpy("poses")
    close(probs, [p["probabilities"] for p in predict["predictions"]])
    close(poses, [p["poses"] for p in predict["predictions"]])
    assert probs.argmax(axis=1).tolist() == [p["class_index"] for p in predict["predictions"]]
    ref = direct(sessions["capsnet-mnist"], x)
    close(probs, ref["probabilities"])
    close(result.as_numpy("coupling"), ref["coupling"], "coupling")  # the shipped model's real routing


def test_each_name_reaches_its_own_model(client, sessions, images):
    x = images[:1]
    got = {name: client.infer(name, [image_input(x, True)]).as_numpy("probabilities") for name in sessions}
    for name, probs in got.items():
        close(probs, direct(sessions[name], x)["probabilities"])
    assert np.abs(got["capsnet-mnist"] - got["tiny"]).max() > 1e-3  # really two different models


def test_gzip_request_body(client, sessions, images):
    x = images[:2]
    result = client.infer("tiny", [image_input(x, True)], request_compression_algorithm="gzip")
    close(result.as_numpy("poses"), direct(sessions["tiny"], x)["poses"])


def status_and_message(call):
    with pytest.raises(InferenceServerException) as info:
        call()
    return int(info.value.status()), info.value.message()


def test_tritonclient_errors(client, images):
    x = images[:1]
    wrong_shape = httpclient.InferInput("image", [1, 1, 27, 28], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 1, 27, 28), np.float32))
    status, msg = status_and_message(lambda: client.infer("tiny", [wrong_shape]))
    assert status == 400 and "does not match [-1, 1, 28, 28] (axis 2)" in msg

    wrong_type = httpclient.InferInput("image", [1, 1, 28, 28], "FP64")
    wrong_type.set_data_from_numpy(x.astype(np.float64))
    status, msg = status_and_message(lambda: client.infer("tiny", [wrong_type]))
    assert status == 400 and "datatype must be FP32, got 'FP64'" in msg

    status, msg = status_and_message(lambda: client.infer("nope", [image_input(x, True)]))
    assert status == 404 and "unknown model 'nope'" in msg and "'tiny'" in msg
    status, _ = status_and_message(lambda: client.get_model_metadata("nope"))
    assert status == 404
    status, _ = status_and_message(lambda: client.get_model_metadata("tiny", model_version="7"))
    assert status == 404

    bad = x.copy()
    bad[0, 0, 3, 4] = np.nan
    status, msg = status_and_message(lambda: client.infer("tiny", [image_input(bad, True)]))
    assert status == 400 and "value at [0,0,3,4] is not a finite number" in msg

    outputs = [httpclient.InferRequestedOutput("reconstruction")]
    status, msg = status_and_message(lambda: client.infer("tiny", [image_input(x, False)], outputs=outputs))
    assert status == 400 and "got 'reconstruction'" in msg


def body(data=None, shape=(1, 1, 28, 28), **extra):
    inp = {"name": "image", "datatype": "FP32", "shape": shape if isinstance(shape, str) else list(shape)}
    inp["data"] = [0.5] * 784 if data is None else data
    return orjson.dumps({"inputs": [inp], **extra})


def binary_body(raw: bytes, size: int, shape=(1, 1, 28, 28)):
    head = orjson.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(shape),
                     "parameters": {"binary_data_size": size}}]}
    )  # fmt: skip
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


ZEROS = np.zeros(784, "<f4").tobytes()
CLASSIFY = [{"name": "poses", "parameters": {"classification": 3}}]  # Triton's extension, not served

BAD_REQUESTS = [
    ("not JSON", b"{inputs", {}, 400, "invalid JSON"),
    ("no inputs", b'{"outputs": []}', {}, 400, '"inputs" list'),
    ("unknown input", orjson.dumps({"inputs": [{"name": "x"}]}), {}, 400, "has the inputs ['image']"),
    ("too few values", body([0.5] * 10), {}, 400, "needs 784 values, got 10"),
    ("a string value", body(["0.5"] * 784), {}, 400, "data holds str"),
    ("a boolean value", body([True] * 784), {}, 400, "data holds bool"),
    ("a null value", body([None] * 784), {}, 400, "data holds NoneType"),
    ("out of range", body([0.5] * 783 + [2.0]), {}, 400, "value at [0,0,27,27] is out of range"),
    ("huge number", body([0] * 783 + [1e30]), {}, 400, "value at [0,0,27,27] is out of range: 1e+30"),
    ("infinite number", body()[:-4] + b",1e400]}]}", {}, 400, "invalid JSON"),
    ("too deeply nested", body([[[[[[0.5]]]]]] * 784), {}, 400, "nested deeper"),
    ("empty batch", body([], shape=(0, 1, 28, 28)), {}, 400, "(axis 0)"),
    ("shape not a list", body(shape="1x784"), {}, 400, "shape must be a list of 4 integers"),
    ("batch over the limit", body([0.5] * 784 * 65, shape=(65, 1, 28, 28)), {}, 413, "the limit is 64"),
    ("unknown output", body(outputs=[{"name": "nope"}]), {}, 400, "has the outputs"),
    ("output twice", body(outputs=[{"name": "poses"}] * 2), {}, 400, "asked for twice"),
    ("unsupported output parameter", body(outputs=CLASSIFY), {}, 400, "only output parameter"),
    ("binary size wrong", *binary_body(ZEROS, 100), 400, "binary_data_size must be 3136 bytes"),
    ("binary data short", *binary_body(ZEROS[:1000], 3136), 400, "3136 bytes of binary data announced"),
    ("binary data left over", *binary_body(ZEROS + b"xx", 3136), 400, "2 bytes of binary data belong"),
    ("binary NaN", *binary_body(np.full(784, np.nan, "<f4").tobytes(), 3136), 400, "not a finite number"),
    ("header length past the body", body(), {"Inference-Header-Content-Length": "99999"}, 400, "must be an"),
    ("header length not a number", body(), {"Inference-Header-Content-Length": "abc"}, 400, "must be an"),
    ("corrupt gzip", b"not gzip", {"Content-Encoding": "gzip"}, 400, "corrupt gzip body"),
    ("unknown encoding", body(), {"Content-Encoding": "br"}, 400, "unsupported Content-Encoding"),
]


@pytest.mark.parametrize(
    ("content", "headers", "status", "message"), [pytest.param(*c[1:], id=c[0]) for c in BAD_REQUESTS]
)
def test_malformed_infer_requests_get_the_protocol_error(url, content, headers, status, message):
    r = httpx.post(f"http://{url}/v2/models/tiny/infer", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]


def test_the_server_survives_bad_requests(url, sessions, images):
    """After every bad request above, a good JSON request still gets the right numbers."""
    for _, content, headers, _, _ in BAD_REQUESTS:
        httpx.post(f"http://{url}/v2/models/tiny/infer", content=content, headers=headers)
    x = images[:1]
    doc = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": x.tolist()}],
           "outputs": [{"name": "probabilities"}]}  # fmt: skip
    r = httpx.post(f"http://{url}/v2/models/tiny/infer", content=gzip.compress(orjson.dumps(doc)),
                   headers={"Content-Encoding": "gzip"})  # fmt: skip
    assert r.status_code == 200 and "inference-header-content-length" not in r.headers
    (out,) = r.json()["outputs"]
    assert out["shape"] == [1, 10]
    close(np.asarray(out["data"], np.float32).reshape(1, 10), direct(sessions["tiny"], x)["probabilities"])


def test_unknown_v2_paths_and_bodies_over_the_limit(url):
    r = httpx.get(f"http://{url}/v2/models/tiny/infer")
    assert r.status_code == 404 and "no v2 endpoint GET /v2/models/tiny/infer" in r.json()["error"]
    r = httpx.get(f"http://{url}/v2/repository/index")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(f"http://{url}/v2/models/tiny/infer", content=b" " * 1_000_001)
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_before_startup_everything_is_503():
    app = create_app(Settings())  # no lifespan has run: nothing is loaded
    client = TestClient(app)
    for path in ("/v2/health/ready", "/v2/models/capsnet-mnist", "/v2/models/capsnet-mnist/ready"):
        r = client.get(path)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"error": "the models are not loaded yet"}
    assert client.get("/v2/health/live").status_code == 200


def test_two_directories_with_one_model_name_refuse_to_start(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "again")
    app = create_app(Settings(model_dir=tiny_model_dir, model_dirs=f"{copy},{tiny_model_dir}"))
    with (
        pytest.raises(EngineError, match="two model directories carry the model name 'tiny'"),
        TestClient(app),
    ):
        pass


def test_api_key_guards_v2_but_not_its_health(tiny_model_dir):
    # Ready first: an infer request during the warm-up gets 503 "not loaded yet" (this raced it).
    with live.ready_client(
        Settings(model_dir=tiny_model_dir, api_key="s3cret"), "/v2/health/ready"
    ) as client:
        assert client.get("/v2/health/live").status_code == 200
        denied = client.get("/v2/models/tiny")
        assert denied.status_code == 401 and "API key" in denied.json()["error"]  # the protocol's shape
        assert client.get("/v2").status_code == 401
        r = client.get("/v2/models/tiny", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["name"] == "tiny"
        infer = {
            "inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]
        }
        for _ in range(200):  # the model warms up after startup: wait for it (open with the key)
            if client.get("/v2/health/ready").status_code == 200:
                break
            time.sleep(0.02)
        ok = client.post("/v2/models/tiny/infer", json=infer, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        metrics = client.get("/metrics").text  # labelled by route template, not by model name
        assert (
            'capsnet_requests_total{endpoint="/v2/models/{name}/infer",method="POST",status="200"} 1.0'
            in metrics
        )
        # refused before routing: labelled by the path when it is a route's own (/v2), else "other"
        assert 'capsnet_requests_total{endpoint="/v2",method="GET",status="401"} 1.0' in metrics
        assert 'capsnet_requests_total{endpoint="other",method="GET",status="401"} 1.0' in metrics
