"""Command-line tools the tests need from the dev extra (hadolint, check-jsonschema, kubectl)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def installed_tool(name: str, package: str) -> str:
    """The tool's path; skipped when missing, except under CI, where it fails."""
    # Installed into the test's virtualenv, whose bin/ need not be on PATH (`.venv/bin/python -m pytest`).
    path = shutil.which(
        name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    )
    if path is None:
        reason = f"{name} is not installed (pip install {package})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path
