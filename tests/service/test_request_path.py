"""The request path itself: the fast lane answers exactly as FastAPI's routes do, and a client that goes
away mid-request is counted as 499 without an error or a traceback in the log."""

from __future__ import annotations

import io
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.factories import mnist_test_images
from tests.live import ready_client
from tests.servers import capsnet_serve


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
