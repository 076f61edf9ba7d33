"""Every malformed input of the preprocessing corpora (tests/service/test_preprocess.py: BAD_IMAGES,
BAD_ARRAYS) sent over HTTP in each form a client can send it: a raw image body and a multipart upload for
the images, a JSON body for the arrays. Each gets the corpus's status with a `detail` that names no path
and shows no traceback, and the next good request still gets the same numbers as before.

One app (the tiny model) serves them all, in one test per input and form.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys

import numpy as np
import onnxruntime as ort
import orjson
import pytest

from capsnet.service.settings import Settings
from tests.factories import mnist_test_images
from tests.live import ready_client
from tests.service.test_preprocess import BAD_ARRAYS, BAD_IMAGES, MAX_PIXELS

LEAKS = re.compile(
    r"/(work|usr|home|tmp|opt|root|var|etc)/|\.py\b|site-packages|Traceback|object at 0x|BytesIO"
)


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    # the corpus's statuses assume its pixel limit (a 3000x3000 PNG is over it, 413)
    with ready_client(Settings(model_dir=tiny_model_dir, max_image_pixels=MAX_PIXELS)) as c:
        yield c


@pytest.fixture(scope="module")
def good(tiny_model_dir):
    """A good request and onnxruntime's answer to it, computed apart from the service."""
    digit = mnist_test_images(1)[:1]
    sess = ort.InferenceSession(str(tiny_model_dir / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probabilities"], {"image": digit})
    return {"images": [digit[0, 0].tolist()]}, probs[0]


def check_refused(r, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail, r.text
    assert not LEAKS.search(detail.replace("image/", "").replace("application/", "")), detail
    assert len(detail) < 400, detail
    return detail


def check_next_request_is_right(client, good) -> None:
    body, probs = good
    ok = client.post("/predict", json=body)
    assert ok.status_code == 200, ok.text
    np.testing.assert_allclose(ok.json()["predictions"][0]["probabilities"], probs, rtol=1e-5)


IMAGE_FORMS = {
    "raw body": lambda data: {"content": data, "headers": {"content-type": "application/octet-stream"}},
    "multipart": lambda data: {"files": {"file": ("upload", data, "application/octet-stream")}},
}


@pytest.mark.parametrize("form", list(IMAGE_FORMS))
@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_over_http(client, good, name, form):
    data, status = BAD_IMAGES[name]
    check_refused(client.post("/predict", **IMAGE_FORMS[form](data)), status)
    check_next_request_is_right(client, good)


def json_body(obj: object) -> bytes:
    """{"images": [obj]} as a careless client would write it: Python's json, NaN and Infinity tokens
    included, nesting as deep as the object."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        return json.dumps({"images": [obj]}).encode()
    finally:
        sys.setrecursionlimit(limit)


def strict_json(body: bytes) -> bool:
    with contextlib.suppress(orjson.JSONDecodeError):
        orjson.loads(body)
        return True
    return False


@pytest.mark.parametrize("name", list(BAD_ARRAYS))
def test_bad_array_over_http(client, good, name):
    obj, message = BAD_ARRAYS[name]
    body = json_body(obj)
    detail = check_refused(
        client.post("/predict", content=body, headers={"content-type": "application/json"}), 422
    )
    if strict_json(body):  # the array's own message, saying which image
        assert detail.startswith("images[0]: ") and message in detail, detail
    else:  # NaN / Infinity tokens, a number past double range, nesting past the parser's depth limit
        assert detail.startswith("invalid JSON"), detail
    check_next_request_is_right(client, good)
