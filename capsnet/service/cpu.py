"""The host CPU's vector extensions, which decide the int8 kernels onnxruntime runs and so what int8 is
worth here. onnxruntime's MLAS picks its kernels by CPUID when it loads and has no API that says which:
this reads the same flags from /proc/cpuinfo and applies MLAS's rule.

Why it matters: an int8 convolution multiplies unsigned 8-bit activations by signed 8-bit weights. With
VNNI (vpdpbusd) or AMX the products are summed in 32 bits, exactly. Without it (AVX2, AVX-512BW) MLAS
sums pairs of products with vpmaddubsw, whose 16-bit result saturates once a pair exceeds 32,767: 8-bit
weights can reach 2 x 255 x 127, 7-bit ones (`capsnet quantize` writes those) at most 2 x 255 x 64,
which fits. So a 7-bit file computes the same integers on every x86 CPU, and VNNI is what makes int8 pay.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

VECTOR_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def vector_extensions(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU's model and vector extensions from `cpuinfo`, the int8 GEMM kernel family MLAS selects
    from them: `vnni` (VNNI or AMX: int8 sums exact and fast) and `int8_saturates` (the vpmaddubsw
    kernels: a file with 8-bit weights answers wrongly). Neither holds where the flags are unknown."""
    flags: set[str] = set()
    model = "unknown"
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:  # not Linux, or no /proc: nothing known
        pass
    # (kernel family, exact 32-bit sums that pay, 16-bit sums that saturate), by MLAS's order of preference
    if "amx_int8" in flags and "amx_tile" in flags:
        kernel, vnni, saturates = "AMX (u8s8 tiles)", True, False
    elif "avx512_vnni" in flags:
        kernel, vnni, saturates = "AVX-512 VNNI (vpdpbusd, u8 x s8)", True, False
    elif "avx_vnni" in flags:
        kernel, vnni, saturates = "AVX-VNNI (256-bit vpdpbusd, u8 x s8)", True, False
    elif "avx512bw" in flags:
        kernel, vnni, saturates = "AVX-512BW (vpmaddubsw, no VNNI)", False, True
    elif "avx2" in flags:
        kernel, vnni, saturates = "AVX2 (vpmaddubsw, no VNNI)", False, True
    else:
        kernel, vnni, saturates = ("SSE" if flags else "unknown"), False, False
    return {
        "model": model,
        "present": [f for f in VECTOR_FLAGS if f in flags],
        "missing": [f for f in VECTOR_FLAGS if f not in flags],
        "int8_kernels": kernel,
        "vnni": vnni,
        "int8_saturates": saturates,
    }


@lru_cache(maxsize=1)
def host() -> dict[str, Any]:
    """This machine's `vector_extensions`, read once."""
    return vector_extensions()
