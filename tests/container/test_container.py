"""The container image, built from docker/Dockerfile and run, answers a prediction correctly.

There is no Docker engine on these machines and no registry to pull from, so the image is built with
`buildah bud --isolation chroot` (CPU flavour) on a Debian base made locally by docker/build-base.sh,
and the server is started inside it with `buildah run --isolation chroot --network host`. Everything
above the base (the Dockerfile's stages, the venv, the model, the user, the healthcheck, the command)
is the same image a GPU host builds from the CUDA base.

Needs root, buildah and debootstrap; skipped without them, except under CI, where it fails instead
(tests/tools.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.tools import skip_unless_ci

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("CAPSNET_BASE_IMAGE", "localhost/capsnet-base")
# TLS to PyPI may be intercepted by a proxy that only the host trusts: lend the build the host's
# bundle through a build-time mount, never a layer.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# CPU flavour on Debian: about 130 MB of base, 230 MB of venv, the model. Torch alone would break it.
MAX_IMAGE_MB = 600
READY_TIMEOUT_S = 180


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, buildah chroot isolation)"
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (apt-get install buildah debootstrap)"
    return None


def _buildah(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"buildah {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def _run_in(container: str, *options: str) -> list[str]:
    """Arguments to `buildah` that run, in `container`, the command that follows them."""
    return ["run", "--isolation", "chroot", *options, container, "--"]


def _inspect(image: str) -> dict[str, Any]:
    return json.loads(_buildah("inspect", "--type", "image", image).stdout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _serving_process_uids(port: int) -> list[int]:
    """Real, effective, saved and filesystem uids of the python process serving on `port`."""
    uids: list[int] = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc_dir / "cmdline").read_bytes().split(b"\0")
            if not (Path(argv[0].decode()).name.startswith("python") and b"serve" in argv
                    and str(port).encode() in argv):  # fmt: skip
                continue
            status = (proc_dir / "status").read_text()
        except OSError:  # the process ended while we looked
            continue
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        uids += [int(uid) for uid in uid_line.split()[1:]]
    return uids


@dataclass
class Server:
    container: str
    port: int
    url: str
    log: Path
    upper_dir: Path | None  # the container's writable overlay layer, where storage is overlay
    upper_before: frozenset[str]


def _upper_dir(container: str) -> Path | None:
    """The container's overlay upper dir (what it wrote), or None for other storage drivers."""
    merged = Path(_buildah("mount", container).stdout.strip())
    _buildah("umount", container)
    upper = merged.parent / "diff"
    return upper if merged.name == "merged" and upper.is_dir() else None


def _listing(upper: Path | None) -> frozenset[str]:
    if upper is None:
        return frozenset()
    return frozenset(str(p.relative_to(upper)) for p in upper.rglob("*"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reason = _missing_prerequisite()
    if reason is not None:
        skip_unless_ci(reason)

    subprocess.run(["bash", "docker/build-base.sh"], cwd=ROOT, check=True, timeout=1200)

    tag = f"localhost/capsnet-service-test:{uuid.uuid4().hex[:12]}"
    # docker format: OCI image configs have no HEALTHCHECK.
    cmd = ["bud", "--isolation", "chroot", "--format", "docker", "--pull=never",
           "-f", "docker/Dockerfile", "-t", tag,
           "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", "FLAVOUR=cpu"]  # fmt: skip
    if HOST_CA_BUNDLE.is_file():
        cmd += ["-v", f"{HOST_CA_BUNDLE.parent}:/host-certs:ro",
                "--build-arg", f"PIP_CERT=/host-certs/{HOST_CA_BUNDLE.name}"]  # fmt: skip
    log = tmp_path_factory.mktemp("build") / "build.log"
    start = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run(
            ["buildah", *cmd, "."], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=1800
        )
    if result.returncode != 0:
        pytest.fail(f"image build failed ({result.returncode}):\n{_tail(log)}")
    print(f"built {tag} in {time.monotonic() - start:.0f} s")  # shown with -s
    try:
        yield tag
    finally:
        _buildah("rmi", "--force", tag, check=False)


@pytest.fixture(scope="module")
def server(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    container = _buildah("from", "--pull=never", "--name", f"capsnet-test-{uuid.uuid4().hex[:8]}", image)
    container = container.stdout.strip()
    proc: subprocess.Popen[bytes] | None = None
    try:
        # A first run lets buildah create its own mount points, so that what appears in the upper
        # dir afterwards was written by the service.
        _buildah(*_run_in(container), "true")
        upper = _upper_dir(container)
        before = _listing(upper)

        port = _free_port()
        serve = ["capsnet", "serve", "--host", "127.0.0.1", "--port", str(port)]
        log = tmp_path_factory.mktemp("server") / "server.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    "buildah",
                    *_run_in(container, "--network", "host", "--env", f"CAPSNET_PORT={port}"),
                    *serve,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so teardown reaches the server
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode} before it was ready:\n{_tail(log)}")
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {READY_TIMEOUT_S} s:\n{_tail(log)}")
            time.sleep(0.5)
        yield Server(container, port, url, log, upper, before)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        _buildah("rm", container, check=False)


def _examples() -> list[Path]:
    examples = sorted(ROOT.glob("examples/[0-9].png"))
    assert examples, "no examples/<digit>.png to send"
    return examples


def test_predicts_the_example_digits(server: Server) -> None:
    for path in _examples():
        response = httpx.post(
            f"{server.url}/predict",
            content=path.read_bytes(),
            headers={"Content-Type": "image/png"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        probabilities = prediction["probabilities"]
        assert (prediction["class_index"], prediction["label"]) == (int(path.stem), path.stem), path.name
        # Capsule lengths: one per class, each in [0, 1), independent; the longest wins.
        assert len(probabilities) == 10
        assert all(0 <= p < 1 for p in probabilities)
        assert prediction["probability"] == max(probabilities)
        assert [len(pose) for pose in prediction["poses"]] == [16] * 10


def test_liveness(server: Server) -> None:
    assert httpx.get(f"{server.url}/health/live", timeout=5).status_code == 200


def test_healthcheck_command(image: str, server: Server) -> None:
    """The image's own HEALTHCHECK, run inside the container: 0 while ready, non-zero with no server."""
    healthcheck = _inspect(image)["Docker"]["config"]["Healthcheck"]
    kind, *command = healthcheck["Test"]
    assert kind == "CMD"

    def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
        options = ("--network", "host", "--env", f"CAPSNET_PORT={port}")
        return _buildah(*_run_in(server.container, *options), *command, check=False)

    ready = run_healthcheck(server.port)
    assert ready.returncode == 0, ready.stderr
    nobody_home = run_healthcheck(_free_port())
    assert nobody_home.returncode != 0


def test_runs_as_non_root(image: str, server: Server) -> None:
    assert _inspect(image)["Docker"]["config"]["User"] == "10001:10001"
    uid = _buildah(*_run_in(server.container), "id", "-u").stdout.strip()
    assert uid == "10001"

    # The serving process itself, seen from the host (buildah, which started it, runs as root).
    uids = _serving_process_uids(server.port)
    assert uids, "serving process not found in /proc"
    assert all(uid != 0 for uid in uids), uids


def test_serving_install_only(server: Server) -> None:
    """No torch, no training code, no pip, no compilers: the runtime holds what serving needs."""
    modules = ("torch", "model_export", "pip", "onnxruntime")
    probe = f"import importlib.util as u; print(*[m for m in {modules} if u.find_spec(m)])"
    found = _buildah(*_run_in(server.container), "python3", "-c", probe)
    assert found.stdout.split() == ["onnxruntime"]
    probe = "for c in gcc cc c++ clang; do command -v $c; done; true"
    compilers = _buildah(*_run_in(server.container), "sh", "-c", probe)
    assert compilers.stdout.split() == []


def test_image_is_small(image: str) -> None:
    layers = json.loads(_inspect(image)["Manifest"])["layers"]
    size_mb = sum(layer["size"] for layer in layers) / 1e6
    print(f"{image}: {size_mb:.0f} MB uncompressed")  # shown with -s
    assert size_mb < MAX_IMAGE_MB


def test_root_filesystem_can_be_read_only(server: Server) -> None:
    """After serving, the container's writable layer holds nothing new outside /tmp.

    So the image runs with a read-only root filesystem (docker-compose.yml: read_only, tmpfs /tmp).
    """
    if server.upper_dir is None:
        skip_unless_ci("container storage is not overlay; cannot see what the container wrote")
    example = _examples()[0]
    response = httpx.post(
        f"{server.url}/predict",
        content=example.read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 200
    written = _listing(server.upper_dir) - server.upper_before
    assert sorted(p for p in written if p != "tmp" and not p.startswith("tmp/")) == []
