"""The memory allocator `capsnet train` runs under.

A training step on the CPU allocates and frees tensors of tens of megabytes (the routing's c * u and
W^T v are J x B x K x N floats, 47 MB each at B = 128). glibc's malloc serves allocations that large
from fresh mmap'd pages and unmaps them on free, so the kernel faults in and zero-fills every page
again at each step's first touch. tcmalloc keeps freed memory for the next step. `capsnet train`
therefore runs itself again with tcmalloc preloaded when the system has the library (Debian:
libtcmalloc-minimal4), as PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) preloads one;
`--malloc system` keeps glibc's. No torch here: this runs before the training imports it.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # the minimal one is all training needs (no heap profiler)
_RAN_AGAIN = "CAPSNET_MALLOC_PRELOADED"  # set in the process run again: never a second time, whatever happens


def in_use() -> str:
    """'tcmalloc', 'jemalloc' or 'glibc': the allocator mapped into this process (from /proc/self/maps;
    'unknown' where there is none, off Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"


def tcmalloc() -> str | None:
    """The tcmalloc library the dynamic loader would find (e.g. 'libtcmalloc_minimal.so.4'), or None."""
    for name in LIBRARIES:
        if found := ctypes.util.find_library(name):
            return found
    return None


def run_again_under_tcmalloc(args: list[str]) -> None:
    """Replace this process by `python -m capsnet *args` with tcmalloc preloaded, when another allocator
    than glibc's is not in use already and the system has tcmalloc; return otherwise (glibc's it is).
    The process keeps its pid, so a pid file written for the first one still stops the training."""
    if os.environ.get(_RAN_AGAIN) or in_use() != "glibc" or (library := tcmalloc()) is None:
        return
    preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    env = {**os.environ, "LD_PRELOAD": preload, _RAN_AGAIN: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "capsnet", *args], env)  # noqa: S606  (this interpreter, our module)
