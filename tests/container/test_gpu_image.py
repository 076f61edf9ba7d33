"""The GPU image, built from docker/Dockerfile's default flavour and checked as far as a machine without
a GPU can check it.

It is the same Debian base as the CPU image with onnxruntime-gpu and NVIDIA's CUDA and cuDNN wheels
(docker/requirements.lock). What the host lends at run time is the driver alone, libcuda.so.1. So,
inside the built image:
- every shared library the CUDA provider links, and every library of the CUDA wheels, resolves through
  the dynamic linker, except libcuda.so.1 (tests/container/cuda_probe.py runs ldd there);
- with a stub libcuda.so.1, built here from the symbols those libraries import from the driver and
  lent to the container for one command (never part of the image), they all load with every symbol
  bound, and onnxruntime opens its CUDA provider and gets as far as asking the driver for a device;
- the service starts, says on /metadata that it runs on the CPU, and classifies the examples;
- with CAPSNET_REQUIRE_GPU=1 (what compose's GPU service sets) it refuses to start, in one line, both
  without a driver and with the stub one;
- the image's size stays under a bound.
What only a GPU host can show (the provider running kernels, figures) is bench/gpu_host.py's job.

Needs root, buildah, debootstrap, and readelf and a C compiler for the stub; skipped without them,
except under CI, where it fails instead (tests/tools.py).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.container.images import (
    ROOT,
    assert_classifies_the_examples,
    buildah,
    free_port,
    inspect,
    new_container,
    run_in,
    serving,
    size_mb,
)
from tests.tools import installed_tool

pytestmark = [pytest.mark.container, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
# The CPU image (~370 MB) plus onnxruntime-gpu and the CUDA wheels unpacked (about 2.3 GB). A torch
# or a second copy of the CUDA libraries would break it.
MAX_IMAGE_MB = 3200
# The libraries the CUDA provider links (readelf -d) and those it opens when a model needs them.
LINKED = {"libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcudart.so.13", "libcuda.so.1"}
ON_DEMAND = {"libcudnn.so.9", "libcufft.so.12", "libnvrtc.so.13"}
MODEL = "/app/models/capsnet-mnist/capsnet.onnx"


@pytest.fixture(scope="module")
def container(gpu_image: str) -> Iterator[str]:
    name = new_container(gpu_image)
    try:
        yield name
    finally:
        buildah("rm", name, check=False)


def _probe(container: str, *args: str, options: tuple[str, ...] = ()) -> tuple[dict[str, object], str]:
    """cuda_probe.py run in the container: its JSON (the last line it prints) and all it printed."""
    result = buildah(*run_in(container, "-v", f"{HERE}:/probe:ro", *options),
                     "python3", "/probe/cuda_probe.py", *args, timeout=300)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout


@pytest.fixture(scope="module")
def resolved(container: str) -> dict[str, object]:
    return _probe(container, "resolve")[0]


@pytest.fixture(scope="module")
def stub_driver(container: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a libcuda.so.1 that defines every driver symbol (cuXxx) the CUDA provider and
    the CUDA wheels import, each a function that fails; for the test only, lent to one command."""
    readelf, cc = installed_tool("readelf", "binutils"), installed_tool("cc", "gcc")
    root = Path(buildah("mount", container).stdout.strip())
    try:
        site = next(root.glob("opt/venv/lib/python3*/site-packages"))
        libraries = [site / "onnxruntime/capi/libonnxruntime_providers_cuda.so",
                     *(p for p in site.glob("nvidia/*/lib/*.so*") if not p.is_symlink())]  # fmt: skip
        symbols: set[str] = set()
        for lib in libraries:
            table = subprocess.run([readelf, "--dyn-syms", "-W", str(lib)], capture_output=True, text=True,
                                   check=True).stdout  # fmt: skip
            symbols |= set(re.findall(r"\sUND\s+(cu[A-Z]\w*)$", table, re.M))
    finally:
        buildah("umount", container)
    # The provider calls the driver for one thing only; a new import shows up here first.
    assert symbols == {"cuTensorMapEncodeTiled"}
    folder = tmp_path_factory.mktemp("stub-driver")
    # 999 is CUDA_ERROR_UNKNOWN: whatever calls the stub is told the driver failed.
    (folder / "stub.c").write_text("".join(f"int {s}(void) {{ return 999; }}\n" for s in sorted(symbols)))
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(folder / "libcuda.so.1"),
                    str(folder / "stub.c")], check=True, timeout=60)  # fmt: skip
    folder.chmod(0o755)  # the container's user (10001) reads it through the bind mount
    return folder


def test_every_library_the_cuda_provider_needs_resolves_but_the_driver(resolved: dict[str, object]) -> None:
    needs = resolved["provider_needs"]
    assert isinstance(needs, dict)
    assert set(needs) >= LINKED
    assert sorted(name for name, path in needs.items() if path is None) == ["libcuda.so.1"]
    venv = "/opt/venv/lib/python3"
    for name in LINKED - {"libcuda.so.1"}:
        assert needs[name].startswith(venv) and "/site-packages/nvidia/cu13/lib/" in needs[name], name
    on_demand = resolved["on_demand"]
    assert isinstance(on_demand, dict) and set(on_demand) == ON_DEMAND
    assert all(path and path.startswith(venv) for path in on_demand.values()), on_demand
    print("resolved:", json.dumps({**needs, **on_demand}, indent=1))  # shown with -s


def test_every_library_of_the_cuda_wheels_resolves(resolved: dict[str, object]) -> None:
    wheels = resolved["wheel_libraries"]
    assert isinstance(wheels, dict)
    names = {Path(p).name for p in wheels}
    # cuDNN's sub-libraries, which libcudnn.so.9 opens itself, are there and resolve too
    assert {"libcudnn_graph.so.9", "libcudnn_cnn.so.9", "libcudnn_ops.so.9", "libnvJitLink.so.13"} <= names
    assert len(wheels) >= 15
    unresolved = {Path(p).name: sorted(n for n, where in needs.items() if where is None)
                  for p, needs in wheels.items()}  # fmt: skip
    assert {lib: missing for lib, missing in unresolved.items() if missing} == {}


def test_onnxruntime_lists_the_cuda_provider(resolved: dict[str, object]) -> None:
    assert resolved["available_providers"][:3] == [  # type: ignore[index]
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
    ]  # fmt: skip


def test_with_a_stub_driver_every_library_loads_and_the_provider_reaches_the_driver(
    container: str, stub_driver: Path
) -> None:
    lent = ("-v", f"{stub_driver}:/stub:ro", "--env", "LD_LIBRARY_PATH=/stub")
    report, printed = _probe(container, "load", MODEL, options=lent)
    loaded = report["loaded"]
    assert isinstance(loaded, dict) and len(loaded) >= 19
    assert {lib: how for lib, how in loaded.items() if how != "ok"} == {}
    # onnxruntime loaded its CUDA provider, which asked the stub for a device, was told no, and said so;
    # the session then runs on the CPU, as the service does
    assert "CUDA driver version is insufficient for CUDA runtime version" in printed
    assert "Failed to load library" not in printed
    assert report["session_providers"] == ["CPUExecutionProvider"]
    # without the stub the provider library cannot load: the driver is what it lacks, and nothing else
    report, printed = _probe(container, "load", MODEL)
    provider = next(how for lib, how in report["loaded"].items() if lib.endswith("providers_cuda.so"))  # type: ignore[union-attr]
    assert "libcuda.so.1: cannot open shared object file" in provider


@pytest.mark.parametrize(
    ("driver", "said"),
    [
        ("none", "no NVIDIA driver found: serving on the CPU"),
        # a driver but no GPU: onnxruntime's CUDA provider loads, finds no device, and the session falls back
        ("stub", "CUDA was requested but onnxruntime fell back to ['CPUExecutionProvider']"),
    ],
)
def test_the_service_falls_back_to_the_cpu_and_says_so(
    container: str, stub_driver: Path, tmp_path_factory: pytest.TempPathFactory, driver: str, said: str
) -> None:
    env = {"CAPSNET_GRPC_PORT": "0"}
    options: tuple[str, ...] = ()
    if driver == "stub":
        env["LD_LIBRARY_PATH"] = "/stub"
        options = ("-v", f"{stub_driver}:/stub:ro")
    log = tmp_path_factory.mktemp("gpu-server") / "server.log"
    with serving(container, log, env, options) as server:
        metadata = httpx.get(f"{server.url}/metadata", timeout=10).json()
        assert metadata["providers"] == ["CPUExecutionProvider"]
        assert metadata["cuda_options"] == {}  # what the CUDA provider was given: nothing, it is unused
        assert_classifies_the_examples(server.url)
    assert said in log.read_text()


@pytest.mark.parametrize("driver", ["none", "stub"])
def test_require_gpu_refuses_to_start_in_one_line(container: str, stub_driver: Path, driver: str) -> None:
    options = ["--network", "host", "--env", "CAPSNET_REQUIRE_GPU=1", "--env", "CAPSNET_GRPC_PORT=0"]
    if driver == "stub":
        options += ["-v", f"{stub_driver}:/stub:ro", "--env", "LD_LIBRARY_PATH=/stub"]
    serve = ["capsnet", "serve", "--host", "127.0.0.1", "--port", str(free_port())]
    result = buildah(*run_in(container, *options), *serve, check=False, timeout=180)
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if "CAPSNET_REQUIRE_GPU" in line]
    assert "Traceback" not in result.stderr and len(said) == 1, result.stderr
    line = said[0]
    assert line.startswith("capsnet serve: CAPSNET_REQUIRE_GPU=1 but ") and len(line) < 400
    if driver == "none":
        assert "no NVIDIA driver (libcuda.so.1) is visible" in line
    else:  # a driver is there, the GPU is not: onnxruntime fell back, and the service refuses that
        assert "CUDA provider is not usable here; onnxruntime fell back to ['CPUExecutionProvider']" in line


def test_the_gpu_host_script_reports_what_fails_in_the_image(container: str, stub_driver: Path) -> None:
    """bench/gpu_host.py, run as a GPU host's operator runs it (the checkout mounted in the image), with a
    driver but no GPU: each step's failure in the JSON and one line each, exit 1, no traceback."""
    options = ["--network", "host", "-v", f"{ROOT}:/src:ro", "-v", f"{stub_driver}:/stub:ro",
               "--env", "LD_LIBRARY_PATH=/stub", "--workingdir", "/src"]  # fmt: skip
    script = "python3 -m bench.gpu_host --seconds 0.2 --http-seconds 1 --output /tmp/h.json; echo rc=$?; "
    script += "cat /tmp/h.json"
    result = buildah(*run_in(container, *options), "sh", "-c", script, check=False, timeout=300)
    assert "rc=1\n" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.split("rc=1\n", 1)[1])
    folders = [f.split("/site-packages/")[1] for f in report["machine"]["cuda_library_folders"]]
    assert folders == ["nvidia/cu13/lib", "nvidia/cudnn/lib"]
    errors = report["errors"]
    fell_back = "RuntimeError: onnxruntime fell back to ['CPUExecutionProvider'] for capsnet.onnx"
    assert errors["raw fp32"] == fell_back
    assert errors["fp16 model"].startswith("RuntimeError: no capsnet-fp16.onnx in /app/models/capsnet-mnist")
    assert errors["service"].splitlines()[-1].startswith("capsnet serve: CAPSNET_REQUIRE_GPU=1 but the CUDA")
    assert set(report["memory"]) == {"before", "after_raw", "after"}  # no nvidia-smi without the toolkit
    assert "Traceback" not in result.stderr


def test_image_is_the_gpu_flavour_within_its_bound(gpu_image: str) -> None:
    config = inspect(gpu_image)["Docker"]["config"]
    assert config["Labels"]["capsnet.flavour"] == "gpu"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert config["User"] == "10001:10001"
    size = size_mb(gpu_image)
    print(f"{gpu_image}: {size:.0f} MB uncompressed")  # shown with -s
    assert 2000 < size < MAX_IMAGE_MB  # the CUDA wheels are in; nothing twice
