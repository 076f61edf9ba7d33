"""Model control (#35): load and unload are refused by default, over HTTP and gRPC, and the server keeps
serving; in explicit mode they need the admin key, which the API key is not; and explicit mode without
an admin key starts on loopback only."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from capsnet.service.auth import is_loopback, management_route, startup_problem
from capsnet.service.settings import Settings
from tests import live
from tests.factories import mnist_test_images
from tests.servers import capsnet_serve, free_port

ADMIN_KEY, API_KEY = "adm1n", "inf3r"
BODY = {"images": mnist_test_images(1)[:, 0].tolist()}


@contextlib.contextmanager
def serve(tiny_model_dir, **kw) -> Iterator[tuple[str, grpcclient.InferenceServerClient]]:
    """(HTTP base URL, a gRPC client) of a live server of the tiny model."""
    port = free_port()
    settings = Settings(model_dir=tiny_model_dir, grpc_port=port, grpc_host="127.0.0.1", **kw)
    with live.serve(settings) as url:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            yield f"http://{url}", client
        finally:
            client.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def grpc_refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_default_mode_refuses_load_and_unload_and_keeps_serving(tiny_model_dir):
    with serve(tiny_model_dir) as (url, client):
        for action in ("unload", "load"):
            r = httpx.post(f"{url}/v2/repository/models/tiny/{action}")
            assert r.status_code == 403, r.text
            assert "CAPSNET_MODEL_CONTROL=none" in r.json()["error"]
        exc = grpc_refusal(lambda: client.unload_model("tiny"))
        assert (
            exc.status() == "StatusCode.PERMISSION_DENIED" and "CAPSNET_MODEL_CONTROL=none" in exc.message()
        )
        exc = grpc_refusal(lambda: client.load_model("tiny"))
        assert exc.status() == "StatusCode.PERMISSION_DENIED"
        # the repository index stays readable; the model was never touched
        index = httpx.post(f"{url}/v2/repository/index").json()
        assert [(e["name"], e["state"]) for e in index] == [("tiny", "READY")]
        assert client.get_model_repository_index(as_json=True)["models"][0]["state"] == "READY"
        assert httpx.post(f"{url}/predict", json=BODY).status_code == 200
        assert client.is_model_ready("tiny")
        assert httpx.get(f"{url}/metadata").json()["model_control"] == "none"
        metrics = httpx.get(f"{url}/metrics").text  # counted under the route's template
        route = 'endpoint="/v2/repository/models/{name}/unload",method="POST",status="403"'
        assert f"capsnet_requests_total{{{route}}} 1.0" in metrics


def test_default_mode_with_an_api_key_still_refuses_management(tiny_model_dir):
    with serve(tiny_model_dir, api_key=API_KEY) as (url, client):
        r = httpx.post(f"{url}/v2/repository/models/tiny/unload", headers=bearer(API_KEY))
        assert r.status_code == 403 and "CAPSNET_MODEL_CONTROL=none" in r.json()["error"]
        exc = grpc_refusal(
            lambda: client.unload_model("tiny", headers={"authorization": f"Bearer {API_KEY}"})
        )
        assert exc.status() == "StatusCode.PERMISSION_DENIED"
        assert httpx.post(f"{url}/predict", json=BODY, headers=bearer(API_KEY)).status_code == 200


def test_explicit_mode_needs_the_admin_key_and_the_api_key_is_not_it(tiny_model_dir):
    with serve(tiny_model_dir, model_control="explicit", admin_key=ADMIN_KEY, api_key=API_KEY) as (
        url,
        client,
    ):
        assert httpx.get(f"{url}/metadata", headers=bearer(API_KEY)).json()["model_control"] == "explicit"
        unload = f"{url}/v2/repository/models/tiny/unload"
        for headers in ({}, bearer("wrong"), bearer(API_KEY), {"Authorization": ADMIN_KEY}):
            r = httpx.post(unload, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert "admin key (CAPSNET_ADMIN_KEY)" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
        for metadata in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {API_KEY}"}):
            exc = grpc_refusal(lambda m=metadata: client.unload_model("tiny", headers=m))
            assert exc.status() == "StatusCode.UNAUTHENTICATED" and "CAPSNET_ADMIN_KEY" in exc.message()
        assert httpx.post(f"{url}/predict", json=BODY, headers=bearer(API_KEY)).status_code == 200
        # the admin key is not an inference key either
        assert httpx.post(f"{url}/predict", json=BODY, headers=bearer(ADMIN_KEY)).status_code == 401

        assert httpx.post(unload, headers=bearer(ADMIN_KEY)).status_code == 200
        assert httpx.post(f"{url}/predict", json=BODY, headers=bearer(API_KEY)).status_code == 503
        r = httpx.post(f"{url}/v2/repository/models/tiny/load", headers=bearer(ADMIN_KEY))
        assert r.status_code == 200
        assert httpx.post(f"{url}/predict", json=BODY, headers=bearer(API_KEY)).status_code == 200

        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        api = {"authorization": f"Bearer {API_KEY}"}
        client.unload_model("tiny", headers=admin)
        assert (
            client.get_model_repository_index(headers=api, as_json=True)["models"][0]["state"]
            == "UNAVAILABLE"
        )
        client.load_model("tiny", headers=admin)
        assert client.is_model_ready("tiny", headers=api)


def test_explicit_mode_without_an_admin_key_on_loopback_is_open_to_local_operators(tiny_model_dir):
    with serve(tiny_model_dir, model_control="explicit") as (url, client):
        assert httpx.post(f"{url}/v2/repository/models/tiny/unload").status_code == 200
        client.load_model("tiny")
        assert httpx.post(f"{url}/predict", json=BODY).status_code == 200


def test_which_paths_are_management():
    assert management_route("/v2/repository/models/tiny/load") == "/v2/repository/models/{name}/load"
    assert management_route("/v2/repository/models/tiny/unload") == "/v2/repository/models/{name}/unload"
    for path in ("/v2/repository/index", "/v2/repository/models//load", "/v2/repository/models/a/b/load",
                 "/v2/repository/models/tiny/load/", "/v2/models/tiny/infer"):  # fmt: skip
        assert management_route(path) is None, path


def test_startup_problem():
    explicit = Settings(model_control="explicit", grpc_host="127.0.0.1")
    assert startup_problem(Settings(), "0.0.0.0") is None  # model control off: nothing to guard
    assert startup_problem(explicit, "127.0.0.1") is None
    assert startup_problem(Settings(model_control="explicit", grpc_host="::1"), "localhost") is None
    assert "CAPSNET_ADMIN_KEY" in (startup_problem(explicit, "0.0.0.0") or "")
    grpc_open = Settings(model_control="explicit", grpc_host="0.0.0.0", grpc_port=8001)
    assert "on 0.0.0.0" in (startup_problem(grpc_open, "127.0.0.1") or "")
    assert (
        startup_problem(Settings(model_control="explicit", grpc_host="0.0.0.0", grpc_port=0), "::1") is None
    )
    assert startup_problem(Settings(model_control="explicit", admin_key="k"), "0.0.0.0") is None
    same = Settings(model_control="explicit", admin_key="k", api_key="k")
    assert "must differ from CAPSNET_API_KEY" in (startup_problem(same, "127.0.0.1") or "")
    assert [is_loopback(h) for h in ("127.0.0.2", "[::1]", "localhost", "0.0.0.0", "::", "example.org")] == [
        True, True, True, False, False, False]  # fmt: skip


def test_capsnet_serve_refuses_explicit_mode_without_an_admin_key_off_loopback(tiny_model_dir):
    env = {**os.environ, "CAPSNET_MODEL_DIR": str(tiny_model_dir), "CAPSNET_MODEL_CONTROL": "explicit"}
    env.pop("CAPSNET_ADMIN_KEY", None)
    cmd = [sys.executable, "-m", "capsnet", "serve", "--host", "0.0.0.0", "--port", str(free_port())]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "capsnet serve: CAPSNET_MODEL_CONTROL=explicit without CAPSNET_ADMIN_KEY on 0.0.0.0: anyone who "
        "reaches it could unload the models; set CAPSNET_ADMIN_KEY, or listen on 127.0.0.1 only"
    ]


def test_capsnet_serve_starts_explicit_mode_without_an_admin_key_on_loopback(tiny_model_dir, tmp_path):
    env = {
        "CAPSNET_MODEL_DIR": str(tiny_model_dir),
        "CAPSNET_MODEL_CONTROL": "explicit",
        "CAPSNET_GRPC_PORT": "0",
    }
    with capsnet_serve(tmp_path, env, args=("--host", "127.0.0.1")) as server:
        assert httpx.get(f"{server.url}/metadata").json()["model_control"] == "explicit"
