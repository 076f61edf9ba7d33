"""schemathesis against the service's own /openapi.json: generated requests for every operation and
input form; no 5xx, and every answer conforms to the documented status codes, content types, headers
and schemas."""

import io
import os
from collections import Counter

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import positive_data_acceptance

from service.settings import Settings
from tests.live import serve

pytestmark = pytest.mark.slow
EXAMPLES = int(os.environ.get("CAPSNET_FUZZ_EXAMPLES", "100"))


@pytest.fixture(scope="module")
def base_url(tiny_model_dir):
    with serve(Settings(model_dir=tiny_model_dir, max_images=4, max_upload_bytes=256 * 1024)) as url:
        yield f"http://{url}"


@st.composite
def image_files(draw) -> bytes:
    """Real images of any size, mode and format the service decodes, with random content."""
    h, w = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I;16"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).convert(mode)
    if fmt == "JPEG" and mode not in ("L", "RGB"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError):  # a mode this format cannot store (e.g. 16-bit as BMP)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return buf.getvalue()


BODIES = st.one_of(image_files(), st.binary(max_size=2048))  # decodable images and junk
for media in ("image/png", "image/jpeg", "application/octet-stream"):
    schemathesis.openapi.media_type(media, BODIES)
# A schema cannot say "bytes that decode to an image with ink" or "class_index below the model's
# class count", so a schema-valid request may rightly be refused with a documented 4xx.
EXCLUDED = [positive_data_acceptance]


def fuzz(operation, real: dict, calls: Counter, statuses: Counter, failures: dict) -> None:
    @given(case=operation.as_strategy(), real_name=st.booleans())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case, real_name):
        if real_name and "name" in (case.path_parameters or {}):  # reach past the 404 half the time
            case.path_parameters.update({k: v for k, v in real.items() if k in case.path_parameters})
        if real_name and "model" in (case.query or {}):  # the REST routes' `?model=`, the same way
            case.query["model"] = real["name"]
        response = case.call()
        calls[operation.label] += 1
        statuses[response.status_code] += 1
        case.validate_response(response, excluded_checks=EXCLUDED)

    try:
        check()
    except Exception as exc:
        failures[operation.label] = f"{type(exc).__name__}: {exc}"[:3000]


def test_generated_requests_for_every_operation_conform(base_url):
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    calls: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: dict[str, str] = {}
    meta = httpx.get(f"{base_url}/v2/models/tiny").json()
    real = {"name": meta["name"], "version": meta["versions"][0]}
    for result in schema.get_all_operations():
        fuzz(result.ok(), real, calls, statuses, failures)
    print(f"{sum(calls.values())} cases", dict(calls), dict(sorted(statuses.items())))
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert not [s for s in statuses if s >= 500]
    assert len(calls) >= 10 and (sum(calls.values()) >= 1000 or EXAMPLES < 100)
