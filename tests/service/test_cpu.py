"""The host CPU's features, read as onnxruntime's kernels choose by them: what /metadata and `capsnet
bench` report, and what decides whether an int8 file is served as it is."""

import pytest

from capsnet.service.cpu import VECTOR_FLAGS, host, vector_extensions


@pytest.mark.parametrize(
    ("flags", "kernels", "vnni", "saturates"),
    [
        ("fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16", "AVX-512 VNNI", True, False),
        ("sse2 avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_int8 amx_bf16", "AMX", True, False),
        ("sse2 avx2 fma avx_vnni", "AVX-VNNI", True, False),
        ("sse2 avx2 fma avx512f avx512bw avx512vl", "AVX-512BW (vpmaddubsw, no VNNI)", False, True),
        ("sse2 avx2 fma", "AVX2 (vpmaddubsw, no VNNI)", False, True),
        ("sse2 sse4_1", "SSE", False, False),
    ],
)
def test_vector_extensions_are_read_from_cpuinfo_flags(tmp_path, flags, kernels, vnni, saturates):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        f"processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: {flags}\n\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: avx512_vnni\n"
    )
    ext = vector_extensions(str(cpuinfo))
    assert ext["model"] == "AMD EPYC 9R14"  # the first processor's, like its flags
    assert ext["int8_kernels"].startswith(kernels)
    assert (ext["vnni"], ext["int8_saturates"]) == (vnni, saturates)
    assert ext["present"] == [f for f in VECTOR_FLAGS if f in flags.split()]
    assert sorted(ext["present"] + ext["missing"]) == sorted(VECTOR_FLAGS)


def test_a_host_without_cpuinfo_is_unknown_and_claims_nothing(tmp_path):
    ext = vector_extensions(str(tmp_path / "absent"))
    assert ext["model"] == "unknown" and ext["present"] == [] and ext["int8_kernels"] == "unknown"
    assert ext["vnni"] is False and ext["int8_saturates"] is False


def test_this_host_is_read_once_and_agrees_with_proc_cpuinfo():
    assert host() is host()
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    assert set(host()["present"]) == flags & set(VECTOR_FLAGS)
    # the three CPU kinds this project runs on: AVX2 alone, AVX-512 VNNI, AVX-512 VNNI + AMX
    assert host()["vnni"] == bool(flags & {"avx512_vnni", "avx_vnni"} or {"amx_tile", "amx_int8"} <= flags)
