"""`capsnet train` runs itself under tcmalloc when the system has it (capsnet/model_export/malloc.py)."""

import os
import subprocess
import sys

import pytest

from capsnet.model_export import malloc
from capsnet.model_export.train import load_checkpoint
from tests.factories import TINY
from tests.tools import skip_unless_ci

TRAIN = ["train", "--epochs", "1", "--limit", "32", "--eval-limit", "32", "--batch-size", "16"]
TINY_SET = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]


def train_cli(output, *extra):
    """`python -m capsnet train` as a user runs it: its own process, no LD_PRELOAD of ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "CAPSNET_MALLOC_PRELOADED")}
    cmd = [sys.executable, "-m", "capsnet", *TRAIN, *TINY_SET, "--output", str(output), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_checkpoint(output / "last.pt"), done.stderr


def test_train_runs_under_tcmalloc_and_says_so(tmp_path):
    if malloc.tcmalloc() is None:
        skip_unless_ci("no tcmalloc library (Debian: libtcmalloc-minimal4)")
    state, _ = train_cli(tmp_path / "tc")
    assert state["hardware"].endswith(", tcmalloc allocator"), state["hardware"]
    assert state["command"].startswith("capsnet train --epochs 1")  # the command as typed, not the re-run
    # --malloc system: the C library's, and the checkpoint says that instead
    state, _ = train_cli(tmp_path / "sys", "--malloc", "system")
    assert state["hardware"].endswith(", glibc allocator"), state["hardware"]


def test_without_tcmalloc_train_warns_and_runs_under_glibc(tmp_path, monkeypatch, caplog):
    """A machine without the library: one warning that says what to install, and the run goes on."""
    from capsnet.model_export.train import train

    monkeypatch.setattr(malloc, "tcmalloc", lambda: None)
    monkeypatch.setattr(malloc, "in_use", lambda: "glibc")
    state = train(
        epochs=1,
        limit=16,
        eval_limit=16,
        batch_size=16,
        config_overrides=TINY,
        output=tmp_path,
        progress=False,
    )
    assert state["epoch"] == 1 and state["hardware"].endswith(", glibc allocator")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "libtcmalloc-minimal4" in warnings[0]


def test_running_again_happens_once_and_only_from_glibc(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(malloc, "tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.delenv("CAPSNET_MALLOC_PRELOADED", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    monkeypatch.setattr(malloc, "in_use", lambda: "jemalloc")
    malloc.run_again_under_tcmalloc(["train"])
    assert calls == []  # another allocator than glibc's is the user's choice
    monkeypatch.setattr(malloc, "in_use", lambda: "glibc")
    malloc.run_again_under_tcmalloc(["train", "--epochs", "2"])
    ((executable, argv, env),) = calls
    assert executable == sys.executable
    assert argv == [sys.executable, "-m", "capsnet", "train", "--epochs", "2"]
    assert (
        env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libother.so" and env["CAPSNET_MALLOC_PRELOADED"] == "1"
    )
    monkeypatch.setenv("CAPSNET_MALLOC_PRELOADED", "1")  # the run again: the preload did not take
    malloc.run_again_under_tcmalloc(["train"])
    assert len(calls) == 1


@pytest.mark.parametrize(
    "maps, name", [("7f00 r-xp /usr/lib/libtcmalloc_minimal.so.4\n", "tcmalloc"), ("", "glibc")]
)
def test_in_use_reads_the_process_maps(monkeypatch, tmp_path, maps, name):
    fake = tmp_path / "maps"
    fake.write_text(maps + "7f01 r-xp /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    real_path = malloc.Path
    monkeypatch.setattr(malloc, "Path", lambda p: fake if p == "/proc/self/maps" else real_path(p))
    assert malloc.in_use() == name
