"""The request path itself: the fast lane answers exactly as FastAPI's routes do (for the default model
and for one named by `?model=`), and a client that goes away mid-request is counted as 499 without an
error or a traceback in the log."""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from capsnet.model_export.data import DATASETS
from capsnet.service import inputs, logs
from capsnet.service.engine import available_cores
from capsnet.service.preprocess import preprocess_bytes
from capsnet.service.routes.predict import fast_query, fast_route
from capsnet.service.settings import Settings
from tests.checks import sample
from tests.factories import mnist_test_images
from tests.live import ready_client, slow_classify
from tests.servers import capsnet_serve
from tests.service.photos import render_product

DIGITS, CLOTHES = [str(d) for d in range(10)], list(DATASETS["fashion-mnist"].labels)


def _png(array01: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((array01 * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with ready_client(Settings(model_dir=tiny_model_dir)) as c:
        yield c


def _lanes(client, method, fast_url, general_url, **kw):
    fast, general = client.request(method, fast_url, **kw), client.request(method, general_url, **kw)
    return fast, general


@pytest.mark.parametrize(
    ("query", "body_kind"),
    [("", "png"), ("?preprocess=none", "png"), ("?preprocess=mnist", "png"), ("", "json"), ("", "bad"),
     ("?preprocess=none", "text")],
)  # fmt: skip
def test_fast_lane_answers_byte_for_byte_like_the_route(client, query, body_kind):
    digit = mnist_test_images(1)[0, 0]
    kw = {
        "png": {"content": _png(digit), "headers": {"Content-Type": "image/png"}},
        "json": {"json": {"images": [digit.tolist()]}},
        "bad": {"content": b"\x89PNG\r\n\x1a\n broken", "headers": {"Content-Type": "image/png"}},
        "text": {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
    }[body_kind]
    # an unknown extra query parameter sends the same request through FastAPI's routing and validation
    general = f"/predict{query}{'&' if query else '?'}unused=1"
    fast, slow = _lanes(client, "POST", f"/predict{query}", general, **kw)
    assert fast.status_code == slow.status_code == {"bad": 400, "text": 415}.get(body_kind, 200)
    assert fast.content == slow.content
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
    if fast.status_code == 200:
        probs = np.array(fast.json()["predictions"][0]["probabilities"])
        assert probs.shape == (10,) and np.all((probs > 0) & (probs < 1))
    metrics = client.get("/metrics").text  # both lanes are counted under the route's template
    assert (
        f'capsnet_requests_total{{endpoint="/predict",method="POST",status="{fast.status_code}"}}' in metrics
    )


@pytest.fixture(scope="module")
def two_models(tiny_model_dir, tiny_fashion_model_dir):
    """The tiny model as the default and the tiny Fashion-MNIST one beside it."""
    settings = Settings(model_dir=tiny_model_dir, model_dirs=str(tiny_fashion_model_dir))
    with ready_client(settings) as c:
        yield c


def _batches(client, model):
    """How many inference batches the model ran (the metrics, labelled by model)."""
    return sample(client.get("/metrics").text, f'capsnet_batch_images_count{{model="{model}"}}')


@pytest.mark.parametrize(
    ("query", "body_kind", "status"),
    [("?model=tiny-fashion", "png", 200), ("?model=tiny-fashion", "photo", 200),
     ("?preprocess=none&model=tiny-fashion", "png", 200),
     ("?model=tiny-fashion&preprocess=mnist", "png", 200),
     ("?model=tiny-fashion&preprocess=fashion", "photo", 200), ("?model=tiny", "png", 200),
     ("?model=tiny-fashion", "json", 200), ("?model=tiny-fashion", "bad", 400),
     ("?model=nope", "png", 404), ("?model=nope&preprocess=none", "bad", 404)],
)  # fmt: skip
def test_fast_lane_answers_a_named_model_byte_for_byte_like_the_route(two_models, query, body_kind, status):
    digit = mnist_test_images(1)[0, 0]
    png = {"Content-Type": "image/png"}
    kw = {
        "png": {"content": _png(digit), "headers": png},
        "photo": {"content": render_product(np.random.default_rng(0)), "headers": png},
        "json": {"json": {"images": [digit.tolist()]}},
        "bad": {"content": b"\x89PNG\r\n\x1a\n broken", "headers": {"Content-Type": "image/png"}},
    }[body_kind]
    assert fast_route({"path": "/predict", "query_string": query[1:].encode()}) is not None
    general = f"/predict{query}&unused=1"
    assert fast_route({"path": "/predict", "query_string": general.split("?")[1].encode()}) is None
    name = re.search(r"model=([\w-]+)", query)[1]
    before = _batches(two_models, name)
    fast, slow = _lanes(two_models, "POST", f"/predict{query}", general, **kw)
    assert fast.status_code == slow.status_code == status, fast.text
    assert fast.content == slow.content
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
    if status == 200:
        assert fast.json()["model"]["name"] == name
        labels = fast.json()["predictions"][0]["label"]
        assert labels in (CLOTHES if name == "tiny-fashion" else DIGITS)
        assert _batches(two_models, name) == before + 2  # both lanes' inferences, under the model asked for
    elif status == 404:
        assert fast.json() == {"detail": "unknown model 'nope'; this server has ['tiny', 'tiny-fashion']"}


@pytest.mark.parametrize(
    ("query", "taken"),
    [(b"", (None, None)), (b"model=a", ("a", None)), (b"preprocess=fashion", (None, "fashion")),
     (b"preprocess=none&model=m.1_x-y", ("m.1_x-y", "none")), (b"model=a&preprocess=mnist", ("a", "mnist")),
     (b"model=a&model=b", None), (b"model=a%20b", None), (b"model=a+b", None), (b"model=", None),
     (b"preprocess=mnist&preprocess=none", None), (b"preprocess=fancy", None), (b"preprocess=", None),
     (b"model=a&", None), (b"&model=a", None), (b"model", None), (b"Model=a", None), (b"x=1", None)],
)  # fmt: skip
def test_the_query_strings_the_fast_lane_takes(query, taken):
    """Anything else is FastAPI's to parse (decoding, repeats, validation)."""
    assert fast_query(query) == taken


def test_fast_lane_of_v2_infer_equals_the_version_route(client):
    version = client.get("/v2/models/tiny").json()["versions"][0]
    x = mnist_test_images(2).astype("<f4")
    body = {"id": "r1", "inputs": [{"name": "image", "shape": [2, 1, 28, 28], "datatype": "FP32",
                                    "data": x.ravel().tolist()}]}  # fmt: skip
    fast, slow = _lanes(
        client, "POST", "/v2/models/tiny/infer", f"/v2/models/tiny/versions/{version}/infer", json=body
    )
    assert fast.status_code == slow.status_code == 200 and fast.content == slow.content
    assert fast.json()["id"] == "r1" and fast.json()["outputs"][0]["shape"][0] == 2
    bad = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP16", "data": [0] * 784}]}
    fast, slow = _lanes(client, "POST", "/v2/models/tiny/infer", f"/v2/models/tiny/versions/{version}/infer",
                        json=bad)  # fmt: skip
    assert fast.status_code == slow.status_code == 400 and fast.content == slow.content
    assert "datatype must be FP32" in fast.json()["error"]
    unknown = client.post("/v2/models/nope/infer", json=bad)
    assert unknown.status_code == 404 and "unknown model 'nope'" in unknown.json()["error"]


@pytest.mark.slow
def test_a_client_that_goes_away_is_counted_as_499_and_not_logged_as_an_error(tiny_model_dir, tmp_path):
    with capsnet_serve(tmp_path, {"CAPSNET_MODEL_DIR": str(tiny_model_dir)}) as server:
        paths = ["/predict", "/predict?preprocess=none&x=1", "/routing-trace", "/v2/models/tiny/infer"]
        for path in paths:  # each announces 10,000 bytes, sends 100 and hangs up
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
                s.sendall(head.encode() + b"Content-Length: 10000\r\n\r\n" + b"x" * 100)
                time.sleep(0.2)
        time.sleep(0.5)
        digit = _png(mnist_test_images(1)[0, 0])
        url = f"{server.url}/predict?preprocess=none"
        ok = httpx.post(url, content=digit, headers={"Content-Type": "image/png"})
        assert ok.status_code == 200  # nothing was lost: the next request is answered
        metrics = httpx.get(f"{server.url}/metrics").text
        for endpoint, count in [("/predict", 2), ("/routing-trace", 1), ("/v2/models/{name}/infer", 1)]:
            assert (
                f'capsnet_requests_total{{endpoint="{endpoint}",method="POST",status="499"}} {count}.0'
                in metrics
            )
    text = server.log.read_text()
    assert "Traceback" not in text and "ERROR" not in text and "Exception" not in text, text


def _encoded(array01: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((array01 * 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


SCAN = Path(__file__).resolve().parents[2] / "examples" / "7.png"  # 227x224: 50,848 pixels


def _record_threads(monkeypatch) -> list[tuple[str, str | None]]:
    """preprocess_bytes records the thread it runs on and the request ID of its log lines."""
    calls: list[tuple[str, str | None]] = []

    def recorded(data, **kw):
        entry = logs.current.get()
        calls.append((threading.current_thread().name, entry.request_id if entry else None))
        return preprocess_bytes(data, **kw)

    monkeypatch.setattr(inputs, "preprocess_bytes", recorded)
    return calls


def _upload_blobs() -> dict[str, bytes]:
    digit = mnist_test_images(1)[0, 0]
    big = np.kron(digit, np.ones((11, 11)))  # 308x308: 94,864 pixels, over INLINE_ALONE_PIXELS (65,536)
    return {
        "png": _encoded(digit, "PNG"),
        "tiff": _encoded(digit, "TIFF"),
        "scan": SCAN.read_bytes(),
        "big": _encoded(big, "PNG"),
    }


@pytest.mark.parametrize(
    ("uploads", "where"),
    [
        (["png"], "loop"),  # one 28x28 digit: 784 pixels
        (["png"] * 6, "loop"),  # 4,704 pixels: over INLINE_PIXELS (4,096), but the request is alone
        (["scan"], "loop"),  # 50,848 pixels, under INLINE_ALONE_PIXELS (65,536)
        (["scan", "png"], "loop"),  # 51,632 in all
        (["scan", "scan"], "pool"),  # 101,696: one job on a preprocessing thread for both
        (["big"], "pool"),  # a photo: on a thread even when alone
        (["tiff"], "pool"),  # a header we do not read
    ],
)
def test_small_uploads_are_preprocessed_on_the_event_loop_and_photos_on_a_thread(
    client, sessions, monkeypatch, uploads, where
):
    """One request at a time (the server is otherwise idle): the per-request pixel bound is
    INLINE_ALONE_PIXELS. The bound while others are in progress: the test after this one."""
    blobs = _upload_blobs()
    calls = _record_threads(monkeypatch)
    files = [("files", (f"{k}.{name}", blobs[name])) for k, name in enumerate(uploads)]
    r = client.post("/predict", files=files, headers={"X-Request-ID": "where-1"})
    assert r.status_code == 200, r.text
    threads = {name for name, _ in calls}
    assert len(calls) == len(uploads) and len(threads) == 1
    # the request's context goes along to the thread: its log lines keep the request's ID
    assert {rid for _, rid in calls} == {"where-1"}
    assert threads.pop().startswith("capsnet-preprocess") == (where == "pool")
    # the answers are those of the images as preprocess_bytes makes them (B = 1 each: the routing's
    # sums round a little differently at another batch size)
    for name, item in zip(uploads, r.json()["predictions"], strict=True):
        x = preprocess_bytes(blobs[name], mode="mnist", max_pixels=10**8)[None, None]
        probs, poses = sessions["tiny"].run(["probabilities", "poses"], {"image": x})
        np.testing.assert_allclose(item["probabilities"], probs[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(item["poses"], poses[0], rtol=1e-6, atol=1e-6)


def test_uploads_go_to_a_thread_over_64x64_pixels_while_another_request_is_in_progress(
    tiny_model_dir, sessions, monkeypatch
):
    """While one request waits for its inference, a second request's scan, or six digits, are
    preprocessed on a thread (INLINE_PIXELS), so that the loop stays free to read the others; once
    the first is answered, the scan alone is done on the loop again. The counters return to 0."""
    blobs = _upload_blobs()
    release, held = threading.Event(), threading.Event()

    def hold():
        held.set()
        release.wait(10)

    slow_classify(monkeypatch, hold, when=lambda images: len(images) == 1 and images[0].max() == 0.5)
    calls = _record_threads(monkeypatch)
    grey = {"images": [np.full((28, 28), 0.5).tolist()]}
    settings = Settings(model_dir=tiny_model_dir, max_wait_ms=0, parallel_batches=2)  # one batch held
    with ready_client(settings) as c, ThreadPoolExecutor(1) as pool:
        state = c.app.state.capsnet
        first = pool.submit(c.post, "/predict", json=grey)
        assert held.wait(10)
        assert state.posts_in_flight == 1 and state.alone()
        scan = c.post("/predict", content=blobs["scan"], headers={"Content-Type": "image/png"})
        digits = c.post("/predict", files=[("files", (f"{k}.png", blobs["png"])) for k in range(6)])
        one = c.post("/predict", files=[("files", ("0.png", blobs["png"]))])
        release.set()
        assert first.result().status_code == 200
        alone = c.post("/predict", content=blobs["scan"], headers={"Content-Type": "image/png"})
        assert state.posts_in_flight == 0 and state.infer_calls_in_flight == 0
    assert [r.status_code for r in (scan, digits, one, alone)] == [200] * 4
    threads = [name.startswith("capsnet-preprocess") for name, _ in calls]
    assert threads == [True] + [True] * 6 + [False] + [False]  # the one small digit stays on the loop
    x = preprocess_bytes(blobs["scan"], mode="mnist", max_pixels=10**8)[None, None]
    (expected,) = sessions["tiny"].run(["probabilities"], {"image": x})
    for r in (scan, alone):  # the same answer on either thread
        np.testing.assert_allclose(
            r.json()["predictions"][0]["probabilities"], expected[0], rtol=1e-6, atol=1e-6
        )


def test_the_preprocessing_threads_are_one_per_core():
    pool = inputs._preprocess_pool()
    assert pool is inputs._preprocess_pool()  # one pool for the process
    assert pool._max_workers == available_cores() >= 1


def test_concurrent_photos_are_preprocessed_no_more_at_once_than_there_are_cores(tiny_model_dir):
    """32 scans at once queue for the preprocessing threads (one per core) rather than all running
    together, each then taking several times its own time in the queue for the GIL; all are answered."""
    scan = SCAN.read_bytes()
    lock, running, most = threading.Lock(), [0], [0]

    def counted(data, **kw):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return preprocess_bytes(data, **kw)
        finally:
            with lock:
                running[0] -= 1

    with ready_client(Settings(model_dir=tiny_model_dir)) as c, pytest.MonkeyPatch.context() as mp:
        mp.setattr(inputs, "preprocess_bytes", counted)
        send = lambda _: c.post("/predict", content=scan, headers={"Content-Type": "image/png"})  # noqa: E731
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(send, range(32)))
    assert [a.status_code for a in answers] == [200] * 32
    assert len({a.json()["predictions"][0]["class_index"] for a in answers}) == 1
    assert 1 <= most[0] <= available_cores()
