"""Building the images of docker/Dockerfile with buildah and running `capsnet serve` in them.

There is no Docker engine on these machines and no registry to pull from, so an image is built with
`buildah bud --isolation chroot` on a Debian base made locally by docker/build-base.sh, and the server
is started inside it with `buildah run --isolation chroot --network host`.

Needs root, buildah and debootstrap; a test that needs them is skipped without them, except under CI,
where it fails instead (tests/tools.py).
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.tools import skip_unless_ci

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("CAPSNET_BASE_IMAGE", "localhost/capsnet-base")
# TLS to PyPI may be intercepted by a proxy that only the host trusts: lend the build the host's
# bundle through a build-time mount, never a layer.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
READY_TIMEOUT_S = 180


def missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, buildah chroot isolation)"
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (apt-get install buildah debootstrap)"
    return None


# buildah 1.28 (Debian bookworm) re-executes itself from a sealed in-memory copy of its binary before
# it runs anything; now and then the seal fails with EBUSY ("Close_Fd sealing memfd copy: Device or
# resource busy", runc's old cloned_binary race, which buildah vendors). Nothing has run in the
# container at that point, so the same call is simply made again.
NOTHING_RAN = "sealing memfd copy"


def buildah(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    for _ in range(3):
        result = subprocess.run(
            ["buildah", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode == 0 or NOTHING_RAN not in result.stderr:
            break
    if check and result.returncode != 0:
        pytest.fail(f"buildah {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def run_in(container: str, *options: str) -> list[str]:
    """Arguments to `buildah` that run, in `container`, the command that follows them."""
    return ["run", "--isolation", "chroot", *options, container, "--"]


def inspect(image: str) -> dict[str, Any]:
    return json.loads(buildah("inspect", "--type", "image", image).stdout)


def size_mb(image: str) -> float:
    """The image's layers, uncompressed, in MB."""
    return sum(layer["size"] for layer in json.loads(inspect(image)["Manifest"])["layers"]) / 1e6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def build(flavour: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """docker/Dockerfile's `flavour` image on the local Debian base; its tag."""
    reason = missing_prerequisite()
    if reason is not None:
        skip_unless_ci(reason)
    subprocess.run(["bash", "docker/build-base.sh"], cwd=ROOT, check=True, timeout=1200)

    tag = f"localhost/capsnet-service-test:{flavour}-{uuid.uuid4().hex[:12]}"
    # docker format: OCI image configs have no HEALTHCHECK.
    cmd = ["bud", "--isolation", "chroot", "--format", "docker", "--pull=never",
           "-f", "docker/Dockerfile", "-t", tag,
           "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", f"FLAVOUR={flavour}"]  # fmt: skip
    if HOST_CA_BUNDLE.is_file():
        cmd += ["-v", f"{HOST_CA_BUNDLE.parent}:/host-certs:ro",
                "--build-arg", f"PIP_CERT=/host-certs/{HOST_CA_BUNDLE.name}"]  # fmt: skip
    log = tmp_path_factory.mktemp(f"build-{flavour}") / "build.log"
    start = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run(
            ["buildah", *cmd, "."], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=2400
        )
    if result.returncode != 0:
        pytest.fail(f"{flavour} image build failed ({result.returncode}):\n{tail(log)}")
    print(f"built {tag} in {time.monotonic() - start:.0f} s")  # shown with -s
    return tag


@dataclass
class Server:
    container: str
    port: int
    url: str
    log: Path
    proc: subprocess.Popen[bytes]


def new_container(image: str) -> str:
    name = f"capsnet-test-{uuid.uuid4().hex[:8]}"
    return buildah("from", "--pull=never", "--name", name, image).stdout.strip()


@contextmanager
def serving(
    container: str, log: Path, env: dict[str, str] | None = None, run_options: tuple[str, ...] = ()
) -> Iterator[Server]:
    """`capsnet serve` in `container` on a free local port, once /health/ready answers 200."""
    port = free_port()
    options = [*run_options, "--network", "host", "--env", f"CAPSNET_PORT={port}"]
    for name, value in (env or {}).items():
        options += ["--env", f"{name}={value}"]
    serve = ["capsnet", "serve", "--host", "127.0.0.1", "--port", str(port)]

    def start() -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                ["buildah", *run_in(container, *options), *serve],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so teardown reaches the server
            )

    proc, starts = start(), 1
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                if starts < 3 and NOTHING_RAN in log.read_text(errors="replace"):  # see buildah()
                    proc, starts = start(), starts + 1
                    continue
                pytest.fail(f"server exited {proc.returncode} before it was ready:\n{tail(log)}")
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {READY_TIMEOUT_S} s:\n{tail(log)}")
            time.sleep(0.5)
        yield Server(container, port, url, log, proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def examples() -> list[Path]:
    found = sorted(ROOT.glob("examples/[0-9].png"))
    assert found, "no examples/<digit>.png to send"
    return found


def assert_classifies_the_examples(url: str) -> None:
    """Every examples/<digit>.png POSTed to /predict comes back as its digit, with capsule lengths."""
    for path in examples():
        response = httpx.post(
            f"{url}/predict", content=path.read_bytes(), headers={"Content-Type": "image/png"}, timeout=30
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
