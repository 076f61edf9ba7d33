"""What operators rely on, against the real server where only it can tell: request IDs, JSON logs with
one access line per request, HTTP limits against hostile clients, every model failing fast, and the
CUDA provider's memory settings."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from capsnet.service.settings import Settings
from tests.factories import mnist_test_images
from tests.live import ready_client
from tests.servers import capsnet_serve


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((mnist_test_images(1)[0, 0] * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with ready_client(Settings(model_dir=tiny_model_dir, api_key="k", max_in_flight=64)) as c:
        yield c


AUTH = {"Authorization": "Bearer k"}


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [("POST", "/predict?preprocess=none", 200), ("POST", "/predict?preprocess=none&x=1", 200),
     ("POST", "/v2/models/tiny/infer", 400), ("GET", "/metadata", 200), ("GET", "/nope", 404),
     ("POST", "/routing-trace?iterations=bad", 422)],
)  # fmt: skip
def test_a_valid_request_id_comes_back_on_every_answer(client, method, url, status):
    r = client.request(method, url, content=_png(), headers={**AUTH, "Content-Type": "image/png",
                                                                 "X-Request-ID": "lb-7f3a.91"})  # fmt: skip
    assert r.status_code == status and r.headers["x-request-id"] == "lb-7f3a.91"


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "tab\tin", "é".encode()])
def test_an_invalid_or_missing_request_id_is_replaced_by_a_new_one(client, given):
    headers = {**AUTH} if not given else {**AUTH, "X-Request-ID": given}
    first = client.get("/metadata", headers=headers).headers["x-request-id"]
    second = client.get("/metadata", headers=headers).headers["x-request-id"]
    assert first not in (given, second)  # replaced, and a fresh one each time
    assert len(first) == 24 and all(c in "0123456789abcdef" for c in first)


def test_answers_given_before_any_route_carry_the_request_id_too(client):
    denied = client.get("/metadata", headers={"X-Request-ID": "r-401"})
    assert denied.status_code == 401 and denied.headers["x-request-id"] == "r-401"
    v2_denied = client.post("/v2/models/tiny/infer", headers={"X-Request-ID": "r-v2"})
    assert v2_denied.status_code == 401 and v2_denied.headers["x-request-id"] == "r-v2"
    assert "error" in v2_denied.json()  # v2's shape; its `id` field is the protocol's own, untouched


@pytest.mark.slow
def test_json_logs_one_object_per_line_and_one_access_line_per_request(tiny_model_dir, tmp_path):
    env = {"CAPSNET_MODEL_DIR": str(tiny_model_dir), "CAPSNET_LOG_FORMAT": "json"}
    with capsnet_serve(tmp_path, env) as server:
        png = {"content": _png(), "headers": {"Content-Type": "image/png"}}
        ok = httpx.post(f"{server.url}/predict?preprocess=none", headers={"X-Request-ID": "req-ok",
                        **png["headers"]}, content=png["content"])  # fmt: skip
        bad = httpx.post(f"{server.url}/predict", content=b"not an image",
                         headers={"X-Request-ID": "req-bad", "Content-Type": "image/png"})  # fmt: skip
        gone = httpx.post(f"{server.url}/v2/models/tiny/infer", json={"inputs": []},
                          headers={"X-Request-ID": "req-v2"})  # fmt: skip
        assert (ok.status_code, bad.status_code, gone.status_code) == (200, 415, 400)
        time.sleep(0.3)
    lines = server.log.read_text().splitlines()
    docs = [json.loads(line) for line in lines]  # every line is one JSON object: this raises otherwise
    assert {"uvicorn.error", "capsnet.service.engine", "capsnet.access"} <= {d["logger"] for d in docs}
    access = {d["request_id"]: d for d in docs if d["logger"] == "capsnet.access" and d["method"] == "POST"}
    assert sorted(access) == ["req-bad", "req-ok", "req-v2"]  # exactly one line per request
    line = access["req-ok"]
    assert (line["route"], line["status"], line["model"], line["images"], line["batch"]) == (
        "/predict", 200, "tiny", 1, 1)  # fmt: skip
    assert line["bytes"] == len(ok.content) and 0 < line["duration_ms"] < 30_000 and line["version"]
    assert access["req-bad"]["status"] == 415 and "model" not in access["req-bad"]
    assert access["req-v2"]["route"] == "/v2/models/{name}/infer"
    assert not any("exc_info" in d or d["level"] == "ERROR" for d in docs)  # client mistakes: no traceback


def _open_sockets(pid: int) -> int:
    import os

    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # it can close between the listing and the look
            count += "socket" in os.readlink(f"/proc/{pid}/fd/{fd}")
    return count


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """What the server sent before closing, and after how long (recv until EOF)."""
    sock.settimeout(seconds)
    t0, got = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return got, time.monotonic() - t0


@pytest.mark.slow
def test_hostile_clients_are_cut_off_and_memory_stays_flat(tiny_model_dir, tmp_path):
    env = {"CAPSNET_MODEL_DIR": str(tiny_model_dir), "CAPSNET_HTTP_MAX_HEADER_BYTES": "16384",
           "CAPSNET_HTTP_HEADER_TIMEOUT_S": "1", "CAPSNET_HTTP_BODY_TIMEOUT_S": "1",
           "CAPSNET_HTTP_KEEP_ALIVE_S": "1"}  # fmt: skip
    with capsnet_serve(tmp_path, env) as server:
        baseline_sockets, rss0 = _open_sockets(server.proc.pid), server.rss_mb()
        # 8 connections each sending a 30 MB header that never ends: 431 after 16 KiB, nothing buffered
        huge = []
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Junk: ")
            huge.append(s)
        chunk, sent = b"a" * 65536, [0] * 8
        for k, s in enumerate(huge):
            with pytest.raises(OSError):  # the server closes the connection while we keep sending
                for _ in range(30 * 16):  # 30 MB
                    s.sendall(chunk)
                    sent[k] += len(chunk)
        assert max(sent) < 8 * 2**20  # cut off long before 30 MB
        assert server.rss_mb() - rss0 < 30
        # a head that trickles in, one header line at a time: 408 after the 1 s head timeout
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(b"GET /health/live HTTP/1.1\r\n")
        t0 = time.monotonic()
        with pytest.raises(OSError):
            for _ in range(40):
                slow.sendall(b"X-Drip: 1\r\n")
                time.sleep(0.1)
        assert time.monotonic() - t0 < 3
        # a body that trickles in: the connection is closed after the 1 s body timeout
        body = socket.create_connection(("127.0.0.1", server.port))
        body.sendall(
            b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\nab"
        )
        got, seconds = _closed_within(body, 5)
        assert got == b"" and 0.8 < seconds < 3
        # an idle kept-alive connection: closed after the 1 s keep-alive timeout
        idle = socket.create_connection(("127.0.0.1", server.port))
        idle.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        got, seconds = _closed_within(idle, 5)
        assert got.startswith(b"HTTP/1.1 200") and 0.8 < seconds < 3
        # a connection that never sends a byte: closed (408) after the head timeout
        mute = socket.create_connection(("127.0.0.1", server.port))
        got, seconds = _closed_within(mute, 5)
        assert got.startswith(b"HTTP/1.1 408") and seconds < 3
        time.sleep(0.3)
        for s in [*huge, slow, body, idle, mute]:
            s.close()
        assert _open_sockets(server.proc.pid) <= baseline_sockets  # nothing is kept open
        assert server.rss_mb() - rss0 < 30
        ok = httpx.post(
            f"{server.url}/predict?preprocess=none", content=_png(), headers={"Content-Type": "image/png"}
        )
        assert ok.status_code == 200  # and the server still answers
        big = httpx.get(f"{server.url}/health/live", headers={"X-Junk": "a" * 20000})
        assert big.status_code == 431 and "16384 bytes" in big.json()["detail"]
        normal = httpx.get(f"{server.url}/health/live", headers={"X-Fine": "a" * 8000})
        assert normal.status_code == 200


@pytest.mark.parametrize("kind", ["missing", "duplicate"])
def test_every_model_directory_fails_fast_with_one_line(tiny_model_dir, tmp_path, kind):
    extra = tmp_path / "nowhere" if kind == "missing" else tiny_model_dir.parent / tiny_model_dir.name
    if kind == "duplicate":  # the same model under another path: two directories, one name
        import shutil

        extra = tmp_path / "copy"
        shutil.copytree(tiny_model_dir, extra)
    env = {"CAPSNET_MODEL_DIR": str(tiny_model_dir), "CAPSNET_MODEL_DIRS": str(extra)}
    import os

    r = subprocess.run([sys.executable, "-m", "capsnet", "serve", "--port", "1"], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("capsnet serve: ") and "Traceback" not in r.stderr
    if kind == "missing":
        assert str(extra) in last and "not found" in last
    else:
        assert "both carry the model name 'tiny'" in last


def test_cuda_memory_settings_reach_the_provider(tiny_model_dir, monkeypatch):
    seen = []
    real = ort.InferenceSession

    def spy(path, options, providers):
        seen.append(providers)
        return real(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", spy)
    from capsnet.service.engine import Engine

    # parallel_batches=1: no one-core CPU twin of the classifier (on a CPU fall-back) among `seen`
    s = Settings(model_dir=tiny_model_dir, providers="CUDAExecutionProvider,CPUExecutionProvider",
                 gpu_mem_limit_mb=512, gpu_arena_extend="kNextPowerOfTwo", parallel_batches=1)  # fmt: skip
    engine = Engine.from_settings(s)

    def cuda_options(providers):
        (name, options), cpu = providers
        assert (name, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
        return options

    cuda = cuda_options(seen[0])
    assert cuda["gpu_mem_limit"] == str(512 * 2**20) and cuda["arena_extend_strategy"] == "kNextPowerOfTwo"
    assert engine.cuda_options == {}  # onnxruntime fell back to the CPU here: nothing to report
    both = "CUDAExecutionProvider,CPUExecutionProvider"
    default = Engine.from_settings(Settings(model_dir=tiny_model_dir, providers=both, parallel_batches=1))
    assert default is not None and "gpu_mem_limit" not in cuda_options(seen[-2])  # the classifier's
    assert cuda_options(seen[-2])["arena_extend_strategy"] == "kSameAsRequested"


@pytest.mark.parametrize("setting", [False, True])
def test_intra_op_spinning_reaches_the_sessions(tiny_model_dir, monkeypatch, setting):
    seen = []
    real = ort.InferenceSession

    def spy(path, options, providers):
        seen.append(options)
        return real(path, options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    from capsnet.service.engine import Engine

    Engine.from_settings(Settings(model_dir=tiny_model_dir, intra_op_spinning=setting, parallel_batches=2))
    assert len(seen) == 3  # classifier, its one-core twin for parallel batches, decoder
    for options in seen:
        if setting:  # onnxruntime's own default: spinning, no entry of ours
            with pytest.raises(RuntimeError, match="allow_spinning"):
                options.get_session_config_entry("session.intra_op.allow_spinning")
        else:
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_parallel_batches_add_a_one_core_session_that_answers_bit_for_bit_alike(tiny_model_dir, monkeypatch):
    threads = []
    real = ort.InferenceSession

    def spy(path, options, providers):
        threads.append(options.intra_op_num_threads)
        return real(path, options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    from capsnet.service.engine import Engine, available_cores

    engine = Engine.from_settings(Settings(model_dir=tiny_model_dir, parallel_batches=2))
    assert engine.parallel_batches == 2 and threads == [0, 1, 0]  # classifier, its twin, decoder
    images = np.random.default_rng(0).random((7, 1, 28, 28), dtype=np.float32)
    wide, narrow = engine.classify(images), engine.classify(images, narrow=True)
    assert wide.keys() == narrow.keys() and wide["probabilities"].shape == (7, 10)
    for name in wide:
        np.testing.assert_array_equal(narrow[name], wide[name])
    one = Engine.from_settings(Settings(model_dir=tiny_model_dir, parallel_batches=1))
    assert one.narrow is None and one.parallel_batches == 1
    np.testing.assert_array_equal(one.classify(images, narrow=True)["poses"], wide["poses"])
    auto = Engine.from_settings(Settings(model_dir=tiny_model_dir))  # 0: one batch per core
    assert auto.parallel_batches == available_cores() and (auto.narrow is None) == (available_cores() == 1)
