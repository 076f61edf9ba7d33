"""Print the serving requirements from pyproject.toml, one per line, for the image's flavour.

pyproject.toml stays the one list of dependencies. The gpu flavour takes it as it is; the cpu flavour
swaps onnxruntime-gpu for the CPU-only onnxruntime wheel of the same version (a fraction of the size,
no CUDA provider). Optional extras (torch for training, test tools) are never included.

    python3 docker/requirements.py gpu|cpu [path/to/pyproject.toml] > requirements.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

FLAVOURS = ("gpu", "cpu")


def requirements(pyproject: Path, flavour: str) -> list[str]:
    """The [project] dependencies, with onnxruntime-gpu replaced by onnxruntime for the cpu flavour."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, not {flavour!r}")
    deps: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    if flavour == "gpu":
        return deps
    swapped = [re.sub(r"^onnxruntime-gpu(?=\W|$)", "onnxruntime", dep) for dep in deps]
    if swapped == deps:
        raise ValueError(f"{pyproject} has no onnxruntime-gpu dependency to swap for the cpu flavour")
    return swapped


def main(argv: list[str]) -> None:
    if len(argv) not in (1, 2):
        raise SystemExit(__doc__)
    pyproject = Path(argv[1] if len(argv) == 2 else "pyproject.toml")
    print("\n".join(requirements(pyproject, argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
