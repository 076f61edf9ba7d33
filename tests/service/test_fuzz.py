"""schemathesis against the service's own /openapi.json: generated requests for every operation and
input form; no 5xx, and every answer conforms to the documented status codes, content types, headers
and schemas. Then the whole fuzzer, stateful phase included, against a real `capsnet serve` in both
model-control modes: nothing it sends takes the service down."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance

from capsnet.service.auth import management_route
from capsnet.service.settings import SHIPPED_MODEL, Settings
from tests.live import serve
from tests.servers import capsnet_serve
from tests.service import fuzz_media  # noqa: F401  (registers the image bodies)

pytestmark = pytest.mark.slow
EXAMPLES = int(os.environ.get("CAPSNET_FUZZ_EXAMPLES", "100"))


@pytest.fixture(scope="module")
def base_url(tiny_model_dir):
    with serve(Settings(model_dir=tiny_model_dir, max_images=4, max_upload_bytes=256 * 1024)) as url:
        yield f"http://{url}"


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


# -- the whole fuzzer, stateful phase included, against a real `capsnet serve` (#35)

ROOT = Path(__file__).resolve().parents[2]
STATEFUL_EXAMPLES = int(os.environ.get("CAPSNET_FUZZ_STATEFUL_EXAMPLES", "50"))  # per operation and phase
ADMIN_KEY = "adm1n-withheld"


def run_schemathesis(url: str, tmp_path: Path) -> Counter[tuple[str, int]]:
    """`st run` with every phase (examples, coverage, fuzzing, stateful: sequences of calls that feed one
    answer into the next request, unload included) and the server-error check; (path, status) counts."""
    har = tmp_path / "schemathesis.har"
    cmd = [str(Path(sys.executable).parent / "st"), "run", f"{url}/openapi.json",
           "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", str(STATEFUL_EXAMPLES),
           "--checks", "not_a_server_error", "--report", "har", "--report-har-path", str(har)]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.service.fuzz_media", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    entries = json.loads(har.read_text())["log"]["entries"]
    return Counter((urlsplit(e["request"]["url"]).path, e["response"]["status"]) for e in entries)


def answers_seven(url: str, headers: dict[str, str]) -> None:
    png = (ROOT / "examples" / "7.png").read_bytes()
    r = httpx.post(f"{url}/predict", content=png, headers={"Content-Type": "image/png", **headers})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"] == "7"


@pytest.mark.parametrize(
    ("env", "refused"),
    [({}, 403), ({"CAPSNET_MODEL_CONTROL": "explicit", "CAPSNET_ADMIN_KEY": ADMIN_KEY}, 401)],
    ids=["default", "explicit-key-withheld"],
)
def test_the_stateful_fuzzer_cannot_take_the_service_down(tmp_path, env, refused):
    env = {"CAPSNET_MODEL_DIR": str(SHIPPED_MODEL), "CAPSNET_GRPC_PORT": "0", **env}
    with capsnet_serve(tmp_path, env) as server:
        seen = run_schemathesis(server.url, tmp_path)
        statuses = Counter[int]()
        for (_, status), n in seen.items():
            statuses[status] += n
        management = {status for (path, status) in seen if management_route(path)}
        print(f"{sum(statuses.values())} cases", dict(sorted(statuses.items())), "management:", management)
        assert not [s for s in statuses if s >= 500]
        assert refused in management and 200 not in management  # it tried, and was refused every time
        answers_seven(server.url, {})
        assert httpx.get(f"{server.url}/v2/models/capsnet-mnist/ready").status_code == 200
