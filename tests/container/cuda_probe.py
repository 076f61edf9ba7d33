"""Run inside the GPU image by tests/container/test_gpu_image.py: which shared libraries the CUDA
provider needs and where the dynamic linker finds them; with `load`, the libraries loaded for real.

Standard library and onnxruntime only (what the image has); prints one JSON object.

    python3 cuda_probe.py resolve    # ldd of the provider and of every library of the CUDA wheels
    python3 cuda_probe.py load       # dlopen them (RTLD_NOW) and open a session on the CUDA provider
"""

import ctypes
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort

CAPI = Path(ort.__file__).parent / "capi"
PROVIDER = CAPI / "libonnxruntime_providers_cuda.so"
# Not linked but opened by the provider when a model needs them (readelf -d shows only the others).
ON_DEMAND = ("libcudnn.so.9", "libcufft.so.12", "libnvrtc.so.13")


def wheel_libraries() -> list[Path]:
    """Every shared library of NVIDIA's wheels in this interpreter's site-packages."""
    site = Path(ort.__file__).parent.parent
    return sorted(p for p in site.glob("nvidia/*/lib/*.so*") if p.is_file() and not p.is_symlink())


def ldd(path: Path) -> dict[str, str | None]:
    """Each library `path` needs, directly or through another, and where it resolves (None: not found)."""
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    found: dict[str, str | None] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (?:(not found)|(\S+))", line)
        if m:
            found[m[1]] = None if m[2] else m[3]
    return found


def linker_cache() -> dict[str, str]:
    """soname -> path, as the dynamic linker's cache (ldconfig) has it."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    return {m[1]: m[2] for m in re.finditer(r"^\s*(\S+) \(.*\) => (\S+)$", out, re.M)}


def resolve() -> dict[str, object]:
    cache = linker_cache()
    return {
        "provider": str(PROVIDER),
        "provider_needs": ldd(PROVIDER),
        "on_demand": {name: cache.get(name) for name in ON_DEMAND},
        "wheel_libraries": {str(p): ldd(p) for p in wheel_libraries()},
        "available_providers": ort.get_available_providers(),
    }


def load() -> dict[str, object]:
    loaded: dict[str, str] = {}
    # What onnxruntime does before it opens a provider library: the host symbols it calls back into.
    ctypes.CDLL(str(CAPI / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
    for lib in [PROVIDER, *ON_DEMAND, *wheel_libraries()]:
        try:
            ctypes.CDLL(str(lib), mode=os.RTLD_NOW)
            loaded[str(lib)] = "ok"
        except OSError as exc:
            loaded[str(lib)] = str(exc)
    model = sys.argv[2]
    try:
        session = ort.InferenceSession(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        providers, error = session.get_providers(), None
    except Exception as exc:  # what onnxruntime says when the provider cannot start
        providers, error = None, f"{type(exc).__name__}: {exc}"
    return {"loaded": loaded, "session_providers": providers, "session_error": error}


if __name__ == "__main__":
    print(json.dumps(resolve() if sys.argv[1] == "resolve" else load()))
