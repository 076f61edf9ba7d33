"""Triton's model repository extension: index, load (a reload, without a failed request), unload; and
what several workers make of it, against the real multi-worker server."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from capsnet.service.settings import Settings
from tests.factories import make_checkpoint, mnist_test_images
from tests.live import serve
from tests.servers import capsnet_serve

# The operator's path: explicit model control with the admin key (default mode refuses: test_model_control)
ADMIN_KEY = "adm1n"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
EXPLICIT = {"model_control": "explicit", "admin_key": ADMIN_KEY}


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two exports of a model named `tiny` from different weights, and one named `other`."""
    from capsnet.model_export.export import export

    root = tmp_path_factory.mktemp("versions")
    for key, name, seed in [("v1", "tiny", 1), ("v2", "tiny", 2), ("other", "other", 3)]:
        make_checkpoint(root / f"{key}.pt", seed=seed)
        export(root / f"{key}.pt", root / key, name=name, images=mnist_test_images(8), batches=(1, 7))
    return {k: root / k for k in ("v1", "v2", "other")}


def _put(src, dst):
    """Replace a model directory's files, as an operator rolling out a new version would."""
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)


def _probabilities(model_dir, x):
    sess = ort.InferenceSession(str(model_dir / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"image": x})[0]


def _infer(client, name, x):
    image = httpclient.InferInput("image", list(x.shape), "FP32")
    image.set_data_from_numpy(x, binary_data=True)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=True)
    return client.infer(name, [image], outputs=[out]).as_numpy("probabilities")


def test_index_unload_load_and_a_reload_that_changes_the_version(versions, tmp_path):
    live = tmp_path / "tiny"
    shutil.copytree(versions["v1"], live)
    x = mnist_test_images(3)
    with serve(Settings(model_dir=live, model_dirs=str(versions["other"]), **EXPLICIT)) as url:
        client = httpclient.InferenceServerClient(url)
        index = {e["name"]: e for e in client.get_model_repository_index()}
        assert set(index) == {"tiny", "other"} and all(e["state"] == "READY" for e in index.values())
        v1 = index["tiny"]["version"]
        np.testing.assert_allclose(_infer(client, "tiny", x), _probabilities(versions["v1"], x), rtol=1e-5)

        client.unload_model("other", headers=ADMIN)
        index = {e["name"]: e for e in client.get_model_repository_index()}
        assert (index["other"]["state"], index["other"]["reason"], index["other"]["version"]) == (
            "UNAVAILABLE", "unloaded", "")  # fmt: skip
        assert not client.is_model_ready("other") and client.is_server_ready()  # the loaded ones are
        assert httpx.get(f"http://{url}/health/ready").json() == {"status": "ready"}  # not waited for
        with pytest.raises(InferenceServerException, match="'other' is not loaded"):
            _infer(client, "other", x)
        ready_only = httpx.post(f"http://{url}/v2/repository/index", json={"ready": True}).json()
        assert [e["name"] for e in ready_only] == ["tiny"]
        client.load_model("other", headers=ADMIN)
        np.testing.assert_allclose(
            _infer(client, "other", x), _probabilities(versions["other"], x), rtol=1e-5
        )

        _put(versions["v2"], live)  # a new version in the same directory, then a reload
        client.load_model("tiny", headers=ADMIN)
        index = {e["name"]: e for e in client.get_model_repository_index()}
        assert index["tiny"]["state"] == "READY" and index["tiny"]["version"] != v1
        assert httpx.get(f"http://{url}/metadata").json()["version"] == index["tiny"]["version"]
        new = _infer(client, "tiny", x)
        np.testing.assert_allclose(new, _probabilities(versions["v2"], x), rtol=1e-5)
        assert not np.allclose(new, _probabilities(versions["v1"], x), rtol=1e-3)  # really another model
        predict = httpx.post(f"http://{url}/predict", json={"images": x[:, 0].tolist()}).json()
        got = np.array([p["probabilities"] for p in predict["predictions"]])
        np.testing.assert_allclose(got, new, rtol=1e-5)
        metrics = httpx.get(f"http://{url}/metrics").text
        assert f'capsnet_model_info{{model="tiny",version="{index["tiny"]["version"]}"}} 1.0' in metrics
        assert f'capsnet_model_info{{model="tiny",version="{v1}"}} 0.0' in metrics
        assert 'capsnet_batch_images_count{model="other"}' in metrics  # every inference metric by model

        r = httpx.post(f"http://{url}/v2/repository/models/nope/load", headers=ADMIN)
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
        r = httpx.post(
            f"http://{url}/v2/repository/models/tiny/load",
            json={"parameters": {"config": "{}"}},
            headers=ADMIN,
        )
        assert r.status_code == 400 and "no config or file overrides" in r.json()["error"]
        (live / "capsnet.onnx").write_bytes(b"not a model")  # a broken new version: the old one stays
        r = httpx.post(f"http://{url}/v2/repository/models/tiny/load", headers=ADMIN)
        assert r.status_code == 400 and "failed to load model 'tiny'" in r.json()["error"]
        np.testing.assert_allclose(_infer(client, "tiny", x), new, rtol=1e-5)

        client.unload_model("tiny", headers=ADMIN)  # the default: requests that name no model get 503
        r = httpx.get(f"http://{url}/health/ready")
        assert r.status_code == 503 and r.json()["detail"] == "the default model is unloaded"
        assert client.is_server_ready()  # /v2 as Triton: every loaded model is warm


def test_reloading_under_load_fails_no_request(versions, tmp_path):
    live = tmp_path / "tiny"
    shutil.copytree(versions["v1"], live)
    body = {"images": mnist_test_images(2)[:, 0].tolist()}
    statuses: list[int] = []
    stop = threading.Event()
    with serve(Settings(model_dir=live, **EXPLICIT)) as url:

        def client_loop() -> None:
            with httpx.Client(base_url=f"http://{url}", timeout=30) as c:
                while not stop.is_set():
                    statuses.append(c.post("/predict", json=body).status_code)
                    statuses.append(c.post("/v2/models/tiny/infer", json={"inputs": [{
                        "name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32",
                        "data": body["images"][0]}]}).status_code)  # fmt: skip

        with ThreadPoolExecutor(4) as pool:
            loops = [pool.submit(client_loop) for _ in range(4)]
            time.sleep(0.5)
            for k in range(4):  # four reloads, alternating between two versions of the files
                _put(versions["v2" if k % 2 == 0 else "v1"], live)
                assert (
                    httpx.post(
                        f"http://{url}/v2/repository/models/tiny/load", headers=ADMIN, timeout=60
                    ).status_code
                    == 200
                )
                time.sleep(0.3)
            stop.set()
            for f in loops:
                f.result()
    assert len(statuses) > 40 and set(statuses) == {200}, sorted(set(statuses))


def test_the_repository_index_needs_the_api_key(tiny_model_dir):
    with serve(Settings(model_dir=tiny_model_dir, api_key="k")) as url:
        assert httpx.post(f"http://{url}/v2/repository/index").status_code == 401
        ok = httpx.post(f"http://{url}/v2/repository/index", headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200 and ok.json()[0]["state"] == "READY"


@pytest.mark.slow
def test_two_workers_agree_on_unload_and_load_and_report_metrics_for_the_whole_server(
    tiny_model_dir, tmp_path
):
    env = {"CAPSNET_MODEL_DIR": str(tiny_model_dir), "CAPSNET_MODEL_CONTROL": "explicit",
           "CAPSNET_ADMIN_KEY": ADMIN_KEY}  # fmt: skip
    with capsnet_serve(tmp_path, env, args=("--workers", "2")) as server:

        def ready_everywhere() -> set[int]:
            # new connections land on either worker: ask often enough to reach both
            return {httpx.get(f"{server.url}/v2/models/tiny/ready").status_code for _ in range(24)}

        deadline = time.monotonic() + 60  # each worker warms up on its own: wait until both are ready
        while ready_everywhere() != {200}:
            assert time.monotonic() < deadline, "the second worker did not become ready"
            time.sleep(0.2)
        body = {"images": mnist_test_images(1)[:, 0].tolist()}
        answered = [httpx.post(f"{server.url}/predict", json=body).status_code for _ in range(30)]
        assert answered == [200] * 30
        for _ in range(4):  # every scrape, whichever worker answers it, counts all 30
            metrics = httpx.get(f"{server.url}/metrics").text
            assert 'capsnet_requests_total{endpoint="/predict",method="POST",status="200"} 30.0' in metrics
            assert 'capsnet_batch_images_sum{model="tiny"} 30.0' in metrics
            assert 'capsnet_queue_images{model="tiny"} 0.0' in metrics
        unload = httpx.post(f"{server.url}/v2/repository/models/tiny/unload", headers=ADMIN, timeout=60)
        assert unload.status_code == 200
        assert ready_everywhere() == {503}  # a 200 meant: both workers have unloaded it
        assert httpx.post(f"{server.url}/predict", json=body).status_code == 503
        load = httpx.post(f"{server.url}/v2/repository/models/tiny/load", headers=ADMIN, timeout=60)
        assert load.status_code == 200
        assert ready_everywhere() == {200}
        assert httpx.post(f"{server.url}/predict", json=body).status_code == 200
