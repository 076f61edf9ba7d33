"""The CPU image, built from docker/Dockerfile and run, answers a prediction correctly.

Built with buildah on the local Debian base (tests/container/images.py says how and why). Everything
above the base (the Dockerfile's stages, the venv, the model, the user, the healthcheck, the command)
is what the GPU flavour has too (tests/container/test_gpu_image.py).

Needs root, buildah and debootstrap; skipped without them, except under CI, where it fails instead
(tests/tools.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.container import images
from tests.container.images import (
    assert_classifies_the_examples,
    buildah,
    examples,
    free_port,
    inspect,
    new_container,
    run_in,
    serving,
    size_mb,
)
from tests.tools import skip_unless_ci

pytestmark = pytest.mark.container

# CPU flavour on Debian: about 130 MB of base, 430 MB of venv (OpenCV's wheel a third of it) and 33 MB of
# model came to 594 MB. The bound leaves room for Debian's point releases; torch (about 750 MB) breaks it.
MAX_IMAGE_MB = 680


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
class Server(images.Server):
    upper_dir: Path | None  # the container's writable overlay layer, where storage is overlay
    upper_before: frozenset[str]


def _upper_dir(container: str) -> Path | None:
    """The container's overlay upper dir (what it wrote), or None for other storage drivers."""
    merged = Path(buildah("mount", container).stdout.strip())
    buildah("umount", container)
    upper = merged.parent / "diff"
    return upper if merged.name == "merged" and upper.is_dir() else None


def _listing(upper: Path | None) -> frozenset[str]:
    if upper is None:
        return frozenset()
    return frozenset(str(p.relative_to(upper)) for p in upper.rglob("*"))


@pytest.fixture(scope="module")
def image(cpu_image: str) -> str:
    return cpu_image


@pytest.fixture(scope="module")
def server(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    container = new_container(image)
    try:
        # A first run lets buildah create its own mount points, so that what appears in the upper
        # dir afterwards was written by the service.
        buildah(*run_in(container), "true")
        upper = _upper_dir(container)
        before = _listing(upper)
        log = tmp_path_factory.mktemp("server") / "server.log"
        with serving(container, log) as s:
            yield Server(**vars(s), upper_dir=upper, upper_before=before)
    finally:
        buildah("rm", container, check=False)


def test_predicts_the_example_digits(server: Server) -> None:
    assert_classifies_the_examples(server.url)


def test_liveness(server: Server) -> None:
    assert httpx.get(f"{server.url}/health/live", timeout=5).status_code == 200


def test_healthcheck_command(image: str, server: Server) -> None:
    """The image's own HEALTHCHECK, run inside the container: 0 while ready, non-zero with no server."""
    healthcheck = inspect(image)["Docker"]["config"]["Healthcheck"]
    kind, *command = healthcheck["Test"]
    assert kind == "CMD"

    def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
        options = ("--network", "host", "--env", f"CAPSNET_PORT={port}")
        return buildah(*run_in(server.container, *options), *command, check=False)

    ready = run_healthcheck(server.port)
    assert ready.returncode == 0, ready.stderr
    nobody_home = run_healthcheck(free_port())
    assert nobody_home.returncode != 0


def test_runs_as_non_root(image: str, server: Server) -> None:
    assert inspect(image)["Docker"]["config"]["User"] == "10001:10001"
    uid = buildah(*run_in(server.container), "id", "-u").stdout.strip()
    assert uid == "10001"

    # The serving process itself, seen from the host (buildah, which started it, runs as root).
    uids = _serving_process_uids(server.port)
    assert uids, "serving process not found in /proc"
    assert all(uid != 0 for uid in uids), uids


def test_serving_install_only(server: Server) -> None:
    """No torch, no training code, no pip, no compilers: the runtime holds what serving needs."""
    modules = ("torch", "capsnet.model_export", "pip", "onnxruntime")
    probe = f"import importlib.util as u; print(*[m for m in {modules} if u.find_spec(m)])"
    found = buildah(*run_in(server.container), "python3", "-c", probe)
    assert found.stdout.split() == ["onnxruntime"]
    probe = "for c in gcc cc c++ clang; do command -v $c; done; true"
    compilers = buildah(*run_in(server.container), "sh", "-c", probe)
    assert compilers.stdout.split() == []


def test_image_is_small(image: str) -> None:
    size = size_mb(image)
    print(f"{image}: {size:.0f} MB uncompressed")  # shown with -s
    assert size < MAX_IMAGE_MB


def test_root_filesystem_can_be_read_only(server: Server) -> None:
    """After serving, the container's writable layer holds nothing new outside /tmp.

    So the image runs with a read-only root filesystem (docker-compose.yml: read_only, tmpfs /tmp).
    """
    if server.upper_dir is None:
        skip_unless_ci("container storage is not overlay; cannot see what the container wrote")
    example = examples()[0]
    response = httpx.post(
        f"{server.url}/predict",
        content=example.read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 200
    written = _listing(server.upper_dir) - server.upper_before
    assert sorted(p for p in written if p != "tmp" and not p.startswith("tmp/")) == []
