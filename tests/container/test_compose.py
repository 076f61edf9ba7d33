"""docker-compose.yml started for real: its CPU service, as the README's quick start starts it.

There is no Docker engine here; Debian's podman-compose reads the same file and drives podman (as
root, runc as its runtime, bridge networking with the published ports, configured by
tests/container/containers.conf through CONTAINERS_CONF; scripts/system-deps.sh installs them). Nothing
can be pulled, so the image compose would build, capsnet-service:cpu, is the CPU image the other
container tests build from the same Dockerfile, tagged with that name for the test. Without systemd,
podman does not schedule a container's health checks itself: the test runs compose's check on its
interval with `podman healthcheck run`, and waits for podman to call the container healthy.

Needs root, buildah, debootstrap, podman, podman-compose, runc and iptables; skipped without them,
except under CI, where it fails instead (tests/tools.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.container.images import ROOT, buildah, free_port
from tests.test_docs import README, commands, printed_answer
from tests.tools import installed_tool

pytestmark = pytest.mark.container

CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
SERVICE = "capsnet-cpu"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _seconds(duration: str) -> float:
    """A compose duration such as `15s` or `1m30s`."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture
def compose_env(cpu_image: str) -> Iterator[dict[str, str]]:
    for tool, package in [("podman", "podman"), ("podman-compose", "podman-compose"), ("runc", "runc"),
                          ("iptables", "iptables")]:  # fmt: skip
        installed_tool(tool, package)
    name = "localhost/" + COMPOSE["services"][SERVICE]["image"]
    # A developer's own image of that name is put back afterwards.
    previous = buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", name, check=False)
    buildah("tag", cpu_image, name)
    try:
        yield {
            **os.environ,
            "CONTAINERS_CONF": str(CONTAINERS_CONF),
            "DEPLOY_HOST_HTTP_PORT": str(free_port()),
            "DEPLOY_HOST_GRPC_PORT": str(free_port()),
        }
    finally:
        buildah("rmi", name, check=False)
        if previous.returncode == 0:
            buildah("tag", previous.stdout.strip(), name, check=False)


def _podman(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=120)
    if check and result.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def test_compose_starts_the_cpu_service_healthy_and_it_answers_the_readmes_curl(
    compose_env: dict[str, str],
) -> None:
    env = compose_env
    project = f"capsnet-test-{uuid.uuid4().hex[:8]}"
    compose = ["podman-compose", "-f", "docker-compose.yml", "-p", project]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*compose, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    check = COMPOSE["services"][SERVICE]["healthcheck"]
    interval = _seconds(check["interval"])
    deadline = _seconds(check["start_period"]) + check["retries"] * interval
    try:
        up = run("up", "-d", SERVICE)  # the README's `docker compose up -d capsnet-cpu`
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        containers = _podman(env, "ps", "--all", "--filter", f"label=io.podman.compose.project={project}",
                             "--format", "{{.Names}}").stdout.split()  # fmt: skip
        assert len(containers) == 1, containers  # the CPU service alone, not the GPU one
        (container,) = containers

        # What compose asked of podman: the file's ports, read-only root, no capabilities, the check.
        info = json.loads(_podman(env, "inspect", container).stdout)[0]
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        kind, *command = info["Config"]["Healthcheck"]["Test"]
        if kind == "CMD-SHELL":  # podman-compose hands compose's CMD on as one `/bin/sh -c 'the words'`
            shell, flag, words = shlex.split(" ".join(command))
            assert (shell, flag) == ("/bin/sh", "-c"), command
            command = shlex.split(words)
        assert command == check["test"][1:]
        assert info["Config"]["Env"].count("CAPSNET_REQUIRE_GPU=0") == 1
        ports = {k: v[0]["HostPort"] for k, v in info["HostConfig"]["PortBindings"].items()}
        assert ports == {"8000/tcp": env["DEPLOY_HOST_HTTP_PORT"], "8001/tcp": env["DEPLOY_HOST_GRPC_PORT"]}

        start, status = time.monotonic(), "starting"
        while status != "healthy":
            if time.monotonic() - start > deadline:
                logs = _podman(env, "logs", container, check=False)
                pytest.fail(f"not healthy after {deadline:.0f} s:\n{(logs.stdout + logs.stderr)[-3000:]}")
            time.sleep(min(interval, 3))
            _podman(env, "healthcheck", "run", container, check=False)
            status = _podman(env, "inspect", "--format", "{{.State.Health.Status}}", container).stdout.strip()
        print(f"{SERVICE} healthy {time.monotonic() - start:.0f} s after `up`")  # shown with -s
        ps = _podman(env, "ps", "--filter", f"name={container}", "--format", "{{.Status}}").stdout
        assert "(healthy)" in ps

        # The README's curl, sent to the port compose published.
        curl = commands(README)[0]
        assert curl.startswith("curl ") and "localhost:8000/predict" in curl
        here = curl.replace("curl ", "curl -sS --fail ", 1).replace(
            "localhost:8000", f"localhost:{env['DEPLOY_HOST_HTTP_PORT']}"
        )
        answer = subprocess.run(["bash", "-euo", "pipefail", "-c", here], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert answer.returncode == 0, answer.stderr
        got, want = json.loads(answer.stdout), printed_answer()
        (prediction,) = got["predictions"]
        assert got["model"] == {"name": "capsnet-mnist", "version": want["version"]}
        assert prediction["class_index"] == want["class_index"]
        assert [round(p, 3) for p in prediction["probabilities"]] == want["probabilities"]
    finally:
        down = run("down")
        # podman-compose 1.0 leaves the project's network behind; `docker compose down` removes it
        label = f"label=io.podman.compose.project={project}"
        networks = _podman(env, "network", "ls", "--filter", label, "--quiet", check=False)
        for network in networks.stdout.split():
            _podman(env, "network", "rm", network, check=False)
    assert down.returncode == 0, down.stderr[-3000:]
    assert _podman(env, "ps", "--all", "--filter", label, "--quiet").stdout.split() == []
