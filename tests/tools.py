"""Optional tools the tests need (wrk, chromium, buildah, hadolint, kubernetes-validate, ...): one rule for
all of them. Missing on a developer's machine, the test is skipped; missing under CI, it fails.

CI is any value of the environment variable CI except "", "0" and "false" (`.ci/run` exports CI=true;
GitHub Actions, GitLab and most runners set it too). tests/conftest.py also turns any other skip under CI
into a failure, so nothing is skipped there silently.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def skip_unless_ci(reason: str) -> NoReturn:
    """Skip with `reason` locally; under CI fail with it (a CI machine must have every tool)."""
    if in_ci():
        pytest.fail(f"CI must run this test: {reason}", pytrace=False)
    pytest.skip(reason)


def installed_tool(name: str, package: str) -> str:
    """The command's path (`package` says where it comes from: a PyPI or Debian package)."""
    # Installed into the test's virtualenv, whose bin/ need not be on PATH (`.venv/bin/python -m pytest`).
    path = shutil.which(
        name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    )
    if path is None:
        skip_unless_ci(f"{name} is not installed ({package})")
    return path


def installed_file(path: Path, package: str) -> Path:
    """A file a Debian package installs (e.g. /usr/bin/chromium)."""
    if not os.access(path, os.X_OK):
        skip_unless_ci(f"no {path} ({package})")
    return path


def installed_module(name: str, package: str) -> ModuleType:
    """`importlib.import_module(name)`: pytest.importorskip under the same rule."""
    try:
        return importlib.import_module(name)
    except ImportError:
        skip_unless_ci(f"the Python module {name} is not installed (pip install {package})")
