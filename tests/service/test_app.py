"""The service against a real exported model: every endpoint and input form, on the numbers."""

import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from capsnet.service.app import create_app
from capsnet.service.cpu import host
from capsnet.service.engine import Engine
from capsnet.service.preprocess import preprocess_bytes
from capsnet.service.settings import Settings
from tests.factories import mnist_test_images
from tests.live import ReadyClient, gate_warm_up, ready_client, slow_classify


def png_bytes(array01: np.ndarray, invert=True, scale=6) -> bytes:
    """A 28x28 [0,1] digit drawn as dark ink on light paper, scaled up, as PNG."""
    a = (255 - array01 * 255) if invert else array01 * 255
    img = Image.fromarray(a.astype(np.uint8)).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits():
    return mnist_test_images(8)[:, 0]


@pytest.fixture(scope="module")
def session(tiny_model_dir):
    return ort.InferenceSession(str(tiny_model_dir / "capsnet.onnx"), providers=["CPUExecutionProvider"])


def make_client(model_dir, **kw):
    return ready_client(Settings(model_dir=model_dir, **kw))


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with make_client(tiny_model_dir) as c:
        yield c


def direct(session, arrays):
    x = np.stack(arrays)[:, None].astype(np.float32)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x}), strict=True))


def check_prediction(item, probs, poses):
    """`probs` and `poses` may come from a batch of another size than the service ran: the routing's
    long sums (over 8 x N products) round a little differently per batch shape (the shipped model:
    up to 5.4e-7 on a pose, B = 1 against the same image inside B = 64), hence atol 1e-6."""
    assert item["class_index"] == int(probs.argmax())
    assert item["label"] == str(int(probs.argmax()))
    np.testing.assert_allclose(item["probabilities"], probs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(item["poses"], poses, rtol=1e-6, atol=1e-6)
    assert item["probability"] == pytest.approx(float(probs.max()), rel=1e-6)
    np.testing.assert_allclose(np.linalg.norm(item["poses"], axis=1), item["probabilities"], atol=1e-5)


def test_predict_every_input_form_agrees_with_onnx(client, session, digits):
    pngs = [png_bytes(d) for d in digits[:3]]
    arrays = [preprocess_bytes(p, mode="mnist", max_pixels=10**7) for p in pngs]
    ref = direct(session, arrays)

    r = client.post("/predict", files={"file": ("d.png", pngs[0], "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == "tiny" and len(body["predictions"]) == 1
    check_prediction(body["predictions"][0], ref["probabilities"][0], ref["poses"][0])

    r = client.post("/predict", files=[("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)])
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3
    for i, item in enumerate(preds):  # input order kept
        check_prediction(item, ref["probabilities"][i], ref["poses"][i])

    r = client.post("/predict", content=pngs[1], headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    check_prediction(r.json()["predictions"][0], ref["probabilities"][1], ref["poses"][1])

    r = client.post("/predict", json={"images": [d.tolist() for d in digits[:2]]})
    assert r.status_code == 200, r.text
    ref_json = direct(session, list(digits[:2]))
    for i, item in enumerate(r.json()["predictions"]):
        check_prediction(item, ref_json["probabilities"][i], ref_json["poses"][i])


def test_preprocess_none_takes_mnist_arrays_as_they_are(client, session, digits):
    raw = Image.fromarray((digits[0] * 255).round().astype(np.uint8))
    buf = io.BytesIO()
    raw.save(buf, format="PNG")
    r = client.post("/predict?preprocess=none", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    ref = direct(session, [(digits[0] * 255).round() / 255.0])
    check_prediction(r.json()["predictions"][0], ref["probabilities"][0], ref["poses"][0])


def test_routing_trace_numbers(client, session, digits):
    png = png_bytes(digits[0])
    ref = direct(session, [preprocess_bytes(png, mode="mnist", max_pixels=10**7)])
    r = client.post("/routing-trace", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["iterations"] == 3 and t["classes"] == [str(i) for i in range(10)]
    assert t["primary_capsules"] == {
        "count": 144,
        "types": 4,
        "grid": [6, 6],
        "order": ["type", "row", "col"],
    }
    c = np.array(t["coupling"])
    assert c.shape == (3, 144, 10) and t["coupling_iterations"] == [1, 2, 3]
    np.testing.assert_allclose(c.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(c[0], 0.1, atol=1e-7)  # b = 0: the first iteration is uniform
    np.testing.assert_allclose(c, ref["coupling"][0], atol=1e-6)  # the last one produced the outputs
    check_prediction(t, ref["probabilities"][0], ref["poses"][0])
    a = ref["primary_activations"][0]
    np.testing.assert_allclose(t["primary_activations"], a, rtol=1e-6)
    s = t["summary"]
    assert [x["iteration"] for x in s] == [1, 2, 3]
    np.testing.assert_allclose(s[0]["class_mass"], 0.1, atol=1e-6)
    assert s[0]["mean_entropy"] == pytest.approx(np.log(10), abs=1e-5)
    np.testing.assert_allclose(s[2]["class_mass"], (a / a.sum()) @ c[2], atol=1e-6)
    assert sum(s[2]["class_mass"]) == pytest.approx(1.0, abs=1e-5)


def test_routing_trace_shrinking_options(client, digits):
    png = png_bytes(digits[1])
    full = np.array(
        client.post("/routing-trace", content=png, headers={"content-type": "image/png"}).json()["coupling"]
    )
    r = client.post(
        "/routing-trace?iterations=last&aggregate=type", content=png, headers={"content-type": "image/png"}
    )
    t = r.json()
    assert t["coupling_iterations"] == [3] and t["aggregate"] == "type"
    np.testing.assert_allclose(t["coupling"], full[-1:].reshape(1, 4, 36, 10).mean(2), atol=1e-6)
    r = client.post("/routing-trace?aggregate=position", content=png, headers={"content-type": "image/png"})
    np.testing.assert_allclose(r.json()["coupling"], full.reshape(3, 4, 6, 6, 10).mean(1), atol=1e-6)
    assert len(r.json()["summary"]) == 3  # the summary always covers every iteration
    r = client.post("/routing-trace", files=[("files", ("a.png", png, "image/png"))] * 2)
    assert r.status_code == 422 and "exactly one image" in r.json()["detail"]


def test_health_metadata_metrics(client, tiny_model_dir):
    assert client.get("/health/live").json() == {"status": "alive"}
    assert client.get("/health/ready").status_code == 200
    m = client.get("/metadata").json()
    assert m["name"] == "tiny" and m["routing_iterations"] == 3 and m["labels"][3] == "3"
    assert m["providers"] == ["CPUExecutionProvider"]
    assert [i["name"] for i in m["inputs"]] == ["image"]
    assert m["primary_capsules"]["count"] == 144 and m["decoder"] is True
    assert m["cpu"] == host() and m["cpu"]["int8_kernels"] != "unknown"  # which int8 figures apply here
    client.post("/predict", json={"images": [np.zeros((28, 28)).tolist()]})
    text = client.get("/metrics").text
    assert 'capsnet_requests_total{endpoint="/predict",method="POST",status="200"}' in text
    assert "capsnet_batch_images_bucket" in text and "capsnet_queue_seconds_count" in text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "application/json"} <= set(content)


def _tiff_truncated(png):
    img = Image.open(io.BytesIO(png))
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()[:200]


@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"content": b"hello, not an image", "headers": {"content-type": "image/png"}}, 415, ""),
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, ""),
        ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "Content-Type"),
        ({"content": b"abc"}, 415, "Content-Type"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "invalid JSON"),
        ({"json": {"image": []}}, 422, "images"),
        ({"json": {"images": []}}, 422, "empty"),
        ({"json": {"images": [[[0.5] * 27] * 28]}}, 422, "images[0]"),
        ({"json": {"images": [[[2.0] * 28] * 28]}}, 422, "images[0]"),
        ({"content": b'{"images": [[[NaN]]]}', "headers": {"content-type": "application/json"}}, 422, "JSON"),
        ({"json": {"images": [[[0.0] * 28] * 28] * 65}}, 413, "limit"),
        ({"files": {"other": ("a.png", b"x", "image/png")}}, 422, "file"),
        ({"data": {"file": "text, not a file"}, "files": {"x": ("a", b"1", "text/plain")}}, 422, ""),
    ],
)
def test_bad_input_gets_its_status_and_the_next_request_works(
    client, session, digits, kwargs, status, needle
):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and needle in detail and "Traceback" not in detail
    assert not re.search(r"/(work|usr|home|tmp|opt|root)/|\.py\b|site-packages", r.text), r.text  # no paths
    ok = client.post("/predict", json={"images": [digits[0].tolist()]})
    assert ok.status_code == 200
    np.testing.assert_allclose(
        ok.json()["predictions"][0]["probabilities"],
        direct(session, [digits[0]])["probabilities"][0],
        rtol=1e-6,
    )  # the same answer as before the bad request


def test_body_and_query_limits(tiny_model_dir, digits):
    png = png_bytes(digits[0])
    with make_client(tiny_model_dir, max_upload_bytes=len(png) - 1) as c:
        r = c.post("/predict", content=png, headers={"content-type": "image/png"})
        assert r.status_code == 413 and "limit" in r.json()["detail"]
    with make_client(tiny_model_dir, max_image_pixels=100 * 100) as c:
        r = c.post("/predict", content=png, headers={"content-type": "image/png"})  # 168x168 pixels
        assert r.status_code == 413
        r = c.post("/routing-trace?aggregate=diagonal", json={"images": [digits[0].tolist()]})
        assert r.status_code == 422 and "aggregate" in r.json()["detail"]


def test_concurrent_requests_are_batched_and_equal_single_answers(
    tiny_model_dir, session, digits, monkeypatch
):
    # The first batch is held until all 8 requests wait in the queue, so that the machine's load cannot
    # spread them out in time: what they then share is the batcher's doing, not the scheduler's.
    queued = threading.Event()
    first = threading.Event()

    def hold_the_first() -> None:
        if not first.is_set():
            first.set()
            queued.wait(30)

    slow_classify(monkeypatch, hold_the_first)
    # One batch at a time: with two, the second would run beside the held one instead of waiting.
    with make_client(tiny_model_dir, max_wait_ms=50, max_batch_size=16, parallel_batches=1) as c:
        batcher = c.app.state.capsnet.models.default.batcher
        bodies = [{"images": [d.tolist()]} for d in digits]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(c.post, "/predict", json=b) for b in bodies]
            deadline = time.monotonic() + 30
            while batcher.pending < 8 and time.monotonic() < deadline:
                time.sleep(0.005)
            queued.set()
            answers = [f.result() for f in futures]
        ref = direct(session, list(digits))
        for i, r in enumerate(answers):
            assert r.status_code == 200
            check_prediction(r.json()["predictions"][0], ref["probabilities"][i], ref["poses"][i])
        metrics = c.get("/metrics").text
        count = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("capsnet_batch_images_count")
        )
        total = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("capsnet_batch_images_sum")
        )
        assert total == 8  # the 8 images, and only they, went through the batcher (warm-up bypasses it)
        assert count <= 2, "7 requests waiting in the queue behind a running batch were not batched"


def predict_count(client, status: int) -> float:
    """capsnet_requests_total of POST /predict with `status`, from /metrics (never refused)."""
    prefix = f'capsnet_requests_total{{endpoint="/predict",method="POST",status="{status}"}} '
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def wait_until(condition, what: str, timeout_s: float = 60) -> None:
    """Poll instead of sleeping a guessed time: a loaded CI machine can take longer than any guess."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {timeout_s} s for {what}"
        time.sleep(0.02)


def test_full_queue_gives_503_with_retry_after(tiny_model_dir, digits, monkeypatch):
    release = threading.Event()
    slow_classify(
        monkeypatch, lambda: release.wait(10), when=lambda images: len(images) == 1 and images.any()
    )
    with make_client(tiny_model_dir, queue_size=2, max_batch_size=1, max_wait_ms=0) as c:
        body = {"images": [digits[0].tolist()]}
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(c.post, "/predict", json=body) for _ in range(6)]
            # 1 image in inference, 2 in the queue: at least 3 of the 6 are refused while it is held
            wait_until(lambda: predict_count(c, 503) >= 3, "three 503s")
            release.set()
            statuses = sorted(f.result().status_code for f in futures)
        assert statuses.count(503) >= 3 and statuses.count(200) >= 1
        assert set(statuses) == {200, 503}
        busy = next(f.result() for f in futures if f.result().status_code == 503)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
        assert c.post("/predict", json=body).status_code == 200  # recovers by itself


def test_requests_beyond_max_in_flight_get_503_before_their_body_is_read(tiny_model_dir, digits, monkeypatch):
    release = threading.Event()
    slow_classify(monkeypatch, lambda: release.wait(10))
    with make_client(tiny_model_dir, max_in_flight=3, queue_size=100) as c:
        body = {"images": [digits[0].tolist()]}
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(c.post, "/predict", json=body) for _ in range(8)]
            wait_until(lambda: predict_count(c, 503) >= 5, "the 5 requests over the limit to be refused")
            assert c.get("/health/live").status_code == 200  # GETs are never refused
            release.set()
            answers = [f.result() for f in futures]
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200] * 3 + [503] * 5
        busy = next(a for a in answers if a.status_code == 503)
        assert (
            busy.headers["retry-after"] == "1" and "3 requests in progress (limit 3)" in busy.json()["detail"]
        )
        metrics = c.get("/metrics").text
        assert 'capsnet_requests_total{endpoint="/predict",method="POST",status="503"} 5.0' in metrics
        assert c.post("/predict", json=body).status_code == 200  # recovers by itself


def wait_for(client: TestClient, path: str) -> None:
    """Until GET `path` answers 200 (10 s at most; the assertions after it say what went wrong)."""
    for _ in range(200):
        if client.get(path).status_code == 200:
            return
        time.sleep(0.05)


def test_readiness_is_false_until_warm_up_ran(tiny_model_dir, monkeypatch):
    gate = gate_warm_up(monkeypatch)
    with TestClient(create_app(Settings(model_dir=tiny_model_dir))) as c:
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "starting"
        assert c.post("/predict", json={"images": [np.zeros((28, 28)).tolist()]}).status_code == 503
        assert c.get("/health/live").status_code == 200
        gate.set()
        wait_for(c, "/health/ready")
        assert c.get("/health/ready").json() == {"status": "ready"}


def test_readiness_waits_for_every_model_not_only_the_default(
    tiny_model_dir, tiny_fashion_model_dir, monkeypatch
):
    """A second model still warming up keeps /health/ready (and /v2's) at 503 while the default one
    already answers: a probe that passed then would send traffic the second model refuses."""
    gate = gate_warm_up(monkeypatch, "tiny-fashion")
    settings = Settings(model_dir=tiny_model_dir, model_dirs=str(tiny_fashion_model_dir))
    with TestClient(create_app(settings)) as c:
        wait_for(c, "/v2/models/tiny/ready")  # the default model warms up by itself
        body = {"images": [np.zeros((28, 28)).tolist()]}
        assert c.post("/predict", json=body).status_code == 200
        assert c.post("/predict?model=tiny-fashion", json=body).status_code == 503
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"status": "starting", "detail": "warming up: tiny-fashion"}
        assert c.get("/v2/health/ready").status_code == 503
        gate.set()
        wait_for(c, "/health/ready")
        assert c.get("/health/ready").json() == {"status": "ready"}
        assert c.get("/v2/health/ready").status_code == 200
        assert c.post("/predict?model=tiny-fashion", json=body).status_code == 200


def has_cuda_driver() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_cuda_requested_without_gpu_is_reported_honestly(tiny_model_dir):
    with make_client(tiny_model_dir, providers="CUDAExecutionProvider,CPUExecutionProvider") as c:
        providers = c.get("/metadata").json()["providers"]
        assert ("CUDAExecutionProvider" in providers) == has_cuda_driver()
        assert providers[-1] == "CPUExecutionProvider"


def test_cuda_provider_gets_its_options(tiny_model_dir, monkeypatch):
    seen = []
    real = ort.InferenceSession

    def spy(path, options=None, providers=None):
        seen.append(providers)
        return real(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", spy)
    settings = Settings(
        model_dir=tiny_model_dir, providers="CUDAExecutionProvider,CPUExecutionProvider",
        cudnn_conv_algo_search="HEURISTIC", parallel_batches=2,
    )  # fmt: skip
    Engine.from_settings(settings)
    cuda = (
        "CUDAExecutionProvider",
        {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1",
         "arena_extend_strategy": "kSameAsRequested"},
    )  # fmt: skip
    # classifier, decoder, and, as onnxruntime fell back to the CPU, the classifier's one-core twin
    assert seen == [[cuda, "CPUExecutionProvider"], ["CPUExecutionProvider"], [cuda, "CPUExecutionProvider"]]
    with pytest.raises(ValueError, match="cudnn_conv_algo_search"):
        Settings(cudnn_conv_algo_search="FASTEST")


def test_require_gpu_fails_startup_without_cuda(tiny_model_dir):
    app = create_app(Settings(model_dir=tiny_model_dir, require_gpu=True))
    if has_cuda_driver():  # a GPU host: the same setting starts, on CUDA
        with ReadyClient(app) as c:
            assert c.get("/metadata").json()["providers"][0] == "CUDAExecutionProvider"
        return
    with pytest.raises(Exception, match="CAPSNET_REQUIRE_GPU=1"), TestClient(app):
        pass


def test_missing_model_fails_startup_with_a_clear_message(tmp_path):
    app = create_app(Settings(model_dir=tmp_path))
    with pytest.raises(Exception, match="model file not found"), TestClient(app):
        pass


def test_orjson_keeps_float32_values(client, session, digits):
    """The JSON numbers are onnxruntime's float32 values exactly, written in their shortest form."""
    r = client.post("/predict", json={"images": [digits[2].tolist()]})
    probs = orjson.loads(r.content)["predictions"][0]["probabilities"]
    assert all(isinstance(p, float) for p in probs) and len(probs) == 10
    want = direct(session, [digits[2]])["probabilities"][0]
    np.testing.assert_array_equal(np.array(probs, np.float32), want)  # bit for bit after the round trip
    text = r.content.decode().split('"probabilities":[', 1)[1].split("]", 1)[0]
    significant = [re.sub(r"[eE].*|[-.]", "", t).lstrip("0") for t in text.split(",")]
    assert max(map(len, significant)) <= 9, text  # float32's shortest form; a float64 one needs ~17


def test_too_many_files_in_multipart_is_413(tiny_model_dir, digits):
    png = png_bytes(digits[0], scale=1)
    with make_client(tiny_model_dir, max_images=2) as c:
        r = c.post("/predict", files=[("files", (f"{i}.png", png, "image/png")) for i in range(3)])
        assert r.status_code == 413 and "multipart" in r.json()["detail"]
        assert c.post("/predict", files=[("files", ("a.png", png, "image/png"))] * 2).status_code == 200


def test_slow_inference_gets_504_and_the_service_stays_up(tiny_model_dir, digits, monkeypatch):
    done = threading.Event()
    real = slow_classify(monkeypatch, lambda: (time.sleep(1.0), done.set()))
    with make_client(tiny_model_dir, request_timeout_s=0.2) as c:
        r = c.post("/predict", json={"images": [digits[0].tolist()]})
        assert r.status_code == 504 and "longer than 0.2 s" in r.json()["detail"]
        monkeypatch.setattr(Engine, "classify", real)
        assert done.wait(30)  # the abandoned batch finishes in its worker thread
        assert c.post("/predict", json={"images": [digits[0].tolist()]}).status_code == 200


def _broken_model(kind: str, src, dst):
    import shutil

    if kind == "missing":
        return {}
    shutil.copy(src / "decoder.onnx", dst / "decoder.onnx")
    if kind == "truncated":
        (dst / "capsnet.onnx").write_bytes((src / "capsnet.onnx").read_bytes()[:5000])
    elif kind == "foreign":  # a valid ONNX file, but not a CapsNet classifier
        shutil.copy(src / "decoder.onnx", dst / "capsnet.onnx")
    elif kind == "not onnx":
        (dst / "capsnet.onnx").write_text("<html>404 Not Found</html>")
    else:  # a good model, but a GPU is required on a machine without one
        shutil.copy(src / "capsnet.onnx", dst / "capsnet.onnx")
        return {"CAPSNET_REQUIRE_GPU": "1"}
    return {}


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "model file not found: {dir}/capsnet.onnx"),
        ("truncated", "cannot load capsnet.onnx: "),
        ("not onnx", "cannot load capsnet.onnx: "),
        ("foreign", "capsnet.onnx is not a CapsNet export: inputs ['poses', 'mask']"),
        ("require gpu", "CAPSNET_REQUIRE_GPU=1 but CUDA is not usable: "),
    ],
)
def test_capsnet_serve_refuses_a_bad_model_with_one_clear_line(tiny_model_dir, tmp_path, kind, message):
    import os
    import subprocess
    import sys

    env = {**os.environ, **_broken_model(kind, tiny_model_dir, tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "capsnet", "serve", "--model-dir", str(tmp_path), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("capsnet serve: " + message.format(dir=tmp_path)), proc.stderr
    assert "Traceback" not in proc.stderr and len(last) < 400


def test_reconstruct_equals_the_decoder_on_the_returned_poses(client, tiny_model_dir, digits):
    dec = ort.InferenceSession(str(tiny_model_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    png = png_bytes(digits[3])
    r = client.post("/reconstruct", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    poses = np.array(body["poses"], np.float32)
    k = int(np.linalg.norm(poses, axis=1).argmax())
    assert body["class_index"] == k and body["length"] == pytest.approx(np.linalg.norm(poses[k]), rel=1e-5)
    mask = np.eye(10, dtype=np.float32)[[k]]
    (want,) = dec.run(None, {"poses": poses[None], "mask": mask})
    np.testing.assert_allclose(body["reconstruction"], want[0, 0], atol=1e-6)
    # the same poses sent back directly, for another class, as PNG
    r = client.post("/reconstruct?class_index=2&format=png&scale=2", json={"poses": body["poses"]})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(r.content)))
    assert img.shape == (56, 56)
    (want2,) = dec.run(None, {"poses": poses[None], "mask": np.eye(10, dtype=np.float32)[[2]]})
    np.testing.assert_array_equal(img[::2, ::2], np.clip(np.rint(want2[0, 0] * 255), 0, 255).astype(np.uint8))
    # an edited pose draws something else
    edited = poses.copy()
    edited[k, 0] += 0.25
    r3 = client.post("/reconstruct", json={"poses": edited.tolist()})
    assert np.abs(np.array(r3.json()["reconstruction"]) - want[0, 0]).max() > 1e-4


@pytest.mark.parametrize(
    ("body", "query"),
    [
        ({"poses": [[0.0] * 16] * 9}, ""),
        ({"poses": [[0.0] * 15] * 10}, ""),
        ({"poses": [[1e9] * 16] * 10}, ""),
        ({"poses": [["a"] * 16] * 10}, ""),
        ({"poses": [[0.0] * 16] * 10}, "?class_index=10"),
        ({"poses": [[0.0] * 16] * 10}, "?class_index=-1"),
    ],
)
def test_reconstruct_rejects_bad_poses(client, body, query):
    r = client.post(f"/reconstruct{query}", json=body)
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)


def test_api_key_guards_the_model_endpoints_only(tiny_model_dir, digits):
    body = {"images": [digits[0].tolist()]}
    with make_client(tiny_model_dir, api_key="s3cret", open_metrics=False) as c:
        r = c.post("/predict", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "s3cret" not in r.text and "API key" in r.json()["detail"]
        assert c.post("/predict", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/predict", json=body, headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert c.post("/predict", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health/ready").status_code == 200  # probes stay open
        assert c.get("/metrics").status_code == 401  # closed on request
        assert c.get("/metadata").status_code == 401


def test_cors_is_off_by_default_and_configurable(client, tiny_model_dir):
    pre = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST"}
    r = client.options("/predict", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    with make_client(tiny_model_dir, cors_origins="https://example.org") as c:
        r = c.options("/predict", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://example.org"
        r = c.options("/predict", headers={**pre, "Origin": "https://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_perturb_sweeps_pose_dimensions_like_the_paper(client, tiny_model_dir, digits):
    dec = ort.InferenceSession(str(tiny_model_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    png = png_bytes(digits[4])
    rec = client.post("/reconstruct", content=png, headers={"content-type": "image/png"}).json()
    r = client.post("/perturb?dims=0,5,15", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    p = r.json()
    np.testing.assert_allclose(p["values"], np.arange(-0.25, 0.2501, 0.05), atol=1e-6)  # 11 steps
    grid = np.array(p["reconstructions"])
    assert (
        p["dims"] == [0, 5, 15] and grid.shape == (3, 11, 28, 28) and p["class_index"] == rec["class_index"]
    )
    for row in range(3):  # the middle column is the unperturbed reconstruction
        np.testing.assert_allclose(grid[row, 5], rec["reconstruction"], atol=1e-5)
    poses = np.array(rec["poses"], np.float32)
    k = rec["class_index"]
    tweaked = poses.copy()
    tweaked[k, 5] += 0.25
    (want,) = dec.run(None, {"poses": tweaked[None], "mask": np.eye(10, dtype=np.float32)[[k]]})
    np.testing.assert_allclose(grid[1, 10], want[0, 0], atol=1e-5)
    assert np.abs(grid[1, 10] - grid[1, 0]).max() > 1e-4  # the sweep changes the drawing

    r = client.post("/perturb?format=png&scale=2", json={"poses": rec["poses"]})
    img = np.asarray(Image.open(io.BytesIO(r.content)))
    assert r.headers["content-type"] == "image/png"
    assert img.shape == (2 * (16 * 29 - 1), 2 * (11 * 29 - 1))  # 16 dims x 11 values, 1 px gaps
    for bad in ("dims=16", "dims=a", "dims=1,1", "low=0.3&high=0.1", "step=0.001"):
        assert client.post(f"/perturb?{bad}", json={"poses": rec["poses"]}).status_code == 422, bad


@pytest.mark.parametrize("weighted", [False, True])
def test_routing_heatmap_pixels_follow_the_coupling(client, digits, weighted):
    from capsnet.service.render import HeatmapLayout, colormap

    png = png_bytes(digits[5])
    t = client.post("/routing-trace", content=png, headers={"content-type": "image/png"}).json()
    k = t["class_index"]
    coupling = np.array(t["coupling"], np.float32)
    values = coupling[:, :, k] * (
        np.array(t["primary_activations"], np.float32) if weighted else np.float32(1.0)
    )
    q = f"format=png&weighted={str(weighted).lower()}"
    r = client.post(f"/routing-trace?{q}", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    lay = HeatmapLayout(3, 4, 6)
    assert img.shape[:2] == (lay.size[1], lay.size[0])
    lo, hi = values.min(), values.max()
    for it, i in [(2, int(values[2].argmax())), (2, int(values[2].argmin())), (0, 77), (1, 5)]:
        tt, row, col = i // 36, (i // 6) % 6, i % 6
        x, y = lay.cell_origin(it, tt, row, col)
        want = colormap(np.array((values[it, i] - lo) / (hi - lo) if hi > lo else 0.0))
        np.testing.assert_array_equal(img[y + 2, x + 2], want)  # inside the cell, off its edges
    assert client.post("/routing-trace?format=png&class_index=10", content=png,
                       headers={"content-type": "image/png"}).status_code == 422  # fmt: skip


@pytest.mark.parametrize(("env", "flag", "expected"), [(None, None, 1), ("3", None, 3), ("3", 2, 2)])
def test_capsnet_serve_takes_its_workers_from_capsnet_workers_unless_the_flag_says(
    tiny_model_dir, monkeypatch, env, flag, expected
):
    import uvicorn

    from capsnet.service.cli import serve
    from capsnet.service.settings import get_settings

    if env is None:
        monkeypatch.delenv("CAPSNET_WORKERS", raising=False)
    else:
        monkeypatch.setenv("CAPSNET_WORKERS", env)
    monkeypatch.setenv("CAPSNET_MODEL_DIR", str(tiny_model_dir))
    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: seen.update(kw))
    try:
        serve(host="127.0.0.1", port=1, workers=flag, model_dir=None)
    finally:
        get_settings.cache_clear()
    assert seen["workers"] == expected and seen["factory"] is True


def test_precision_fp16_serves_the_half_precision_file_with_the_same_api(tiny_model_dir, tmp_path):
    import shutil

    from capsnet.model_export.fp16 import write_fp16
    from capsnet.service.engine import Engine, EngineError

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    with pytest.raises(
        EngineError, match=r"CAPSNET_PRECISION=fp16 needs .*capsnet-fp16.onnx: write it with `capsnet fp16"
    ):
        Engine(d, providers="CPUExecutionProvider", precision="fp16")
    write_fp16(d)
    full, half = (
        Engine(d, providers="CPUExecutionProvider"),
        Engine(d, providers="CPUExecutionProvider", precision="fp16"),
    )
    assert half.info.metadata["precision"] == "fp16" and half.info.outputs == full.info.outputs
    x = mnist_test_images(8)
    a, b = full.classify(x), half.classify(x)
    assert set(a) == set(b)
    for name in a:  # within 0.2 % of each output's largest value: zeros would miss it 500-fold
        scale = float(np.abs(a[name]).max())
        assert b[name].dtype == np.float32 and scale > 0.1, name
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=2e-3 * scale, err_msg=name)
    assert (b["probabilities"].argmax(1) == a["probabilities"].argmax(1)).all()


def test_a_model_beside_the_default_without_the_precisions_file_is_served_in_fp32_and_says_so(
    tiny_model_dir, tiny_fashion_model_dir, tmp_path, caplog
):
    # The shipped Fashion-MNIST model has no int8 file (its accuracy gate refused one): with
    # CAPSNET_PRECISION=int8 it must still be served, in fp32, while the default model must have the
    # file. fp16 stands in for int8 here (the same rule; its file is quick to write).
    import logging
    import shutil

    from capsnet.model_export.fp16 import write_fp16
    from capsnet.service.cli import check_models
    from capsnet.service.engine import EngineError

    default, other = tmp_path / "default", tmp_path / "other"
    shutil.copytree(tiny_model_dir, default)
    shutil.copytree(tiny_fashion_model_dir, other)
    write_fp16(default)
    settings = Settings(
        model_dir=default, model_dirs=str(other), precision="fp16", model_control="explicit", admin_key="k"
    )
    assert check_models(settings) == ["tiny", "tiny-fashion"]
    x = mnist_test_images(4)
    with caplog.at_level(logging.WARNING), ready_client(settings, "/health/ready") as c:
        # each model loaded again through the repository API keeps its role: the default one in fp16
        for name in ("tiny-fashion", "tiny"):
            load = c.post(f"/v2/repository/models/{name}/load", headers={"Authorization": "Bearer k"})
            assert load.status_code == 200, load.text
        meta = {name: c.get(f"/metadata?model={name}").json() for name in ("tiny", "tiny-fashion")}
        got = c.post("/predict?model=tiny-fashion&preprocess=none", json={"images": x[:, 0].tolist()})
    assert (meta["tiny"]["precision"], meta["tiny"]["classifier_file"]) == ("fp16", "capsnet-fp16.onnx")
    assert (meta["tiny-fashion"]["precision"], meta["tiny-fashion"]["classifier_file"]) == (
        "fp32",
        "capsnet.onnx",
    )
    want = Engine(other, providers="CPUExecutionProvider").classify(x)["probabilities"]
    probs = np.array([p["probabilities"] for p in got.json()["predictions"]])
    np.testing.assert_allclose(probs, want, rtol=0, atol=1e-6)
    warned = [r.getMessage() for r in caplog.records if "is served in fp32" in r.getMessage()]
    assert len(warned) == 3 and all(
        str(other) in m and "capsnet-fp16.onnx" in m for m in warned
    )  # check, startup and the load
    # The default model without the file is still refused, at the check and at startup.
    swapped = Settings(model_dir=other, model_dirs=str(default), precision="fp16")
    with pytest.raises(EngineError, match=r"CAPSNET_PRECISION=fp16 needs .*other/capsnet-fp16.onnx"):
        check_models(swapped)
    with pytest.raises(EngineError, match="CAPSNET_PRECISION=fp16 needs"), TestClient(create_app(swapped)):
        pass


@pytest.mark.parametrize(("step", "shown"), [("5e-324", "too many"), ("0.001", "501")])
def test_perturb_refuses_more_than_41_sweep_values_even_for_a_vanishing_step(client, digits, step, shown):
    # 0.5 / 5e-324 overflows to inf: counted before any conversion to int (was a 500)
    r = client.post(f"/perturb?step={step}", json={"images": [digits[0].tolist()]})
    assert r.status_code == 422 and r.json()["detail"].startswith(f"{shown} sweep values; at most 41")


@pytest.mark.parametrize("enabled", [False, True])
def test_fastapis_opentelemetry_runs_only_when_asked_for(tiny_model_dir, monkeypatch, enabled):
    # FastAPI looks for a configured OpenTelemetry provider on every request unless its telemetry is
    # off; CAPSNET_OPENTELEMETRY (default off) decides. Counted by the look-ups of the tracer provider.
    from opentelemetry import trace

    looked_up = []
    real = trace.get_tracer_provider

    def counting():
        looked_up.append(1)
        return real()

    monkeypatch.setattr(trace, "get_tracer_provider", counting)
    with ready_client(Settings(model_dir=tiny_model_dir, opentelemetry=enabled)) as c:
        looked_up.clear()
        for _ in range(3):
            r = c.post("/predict", json={"images": [np.zeros((28, 28)).tolist()]})
            assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    assert len(looked_up) >= 3 if enabled else looked_up == []
