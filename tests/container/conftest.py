"""The two images of docker/Dockerfile, each built once per test session and removed after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.container.images import build, buildah


def _built(flavour: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tag = build(flavour, tmp_path_factory)
    try:
        yield tag
    finally:
        buildah("rmi", "--force", tag, check=False)


@pytest.fixture(scope="session")
def cpu_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _built("cpu", tmp_path_factory)


@pytest.fixture(scope="session")
def gpu_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _built("gpu", tmp_path_factory)
