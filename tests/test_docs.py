"""README.md and docs/ stay true to the code.

Every `CAPSNET_*` setting is in docs/configuration.md with the code's default, and every compose variable
with compose's; every route of the OpenAPI document is in docs/api.md and the README's table has the
main ones; every `capsnet` subcommand, `make` target and repository path the pages name exists;
docs/performance.md is what bench/report.py writes from bench/results/*.json; and the curl commands of
the pages run against the service on the shipped model and answer what the README prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter

from bench.report import CURRENT_CPU_RUNS, readme_with_table, render
from capsnet.cli import build_parser
from capsnet.service.app import create_app
from capsnet.service.settings import SHIPPED_MODEL, Settings
from tests.live import serve

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TEXT = {p: p.read_text() for p in PAGES}
README, CONFIG, API = (
    TEXT[ROOT / "README.md"],
    TEXT[ROOT / "docs/configuration.md"],
    TEXT[ROOT / "docs/api.md"],
)
# The pages whose curl commands are run against the service, in this order (later ones use files that
# earlier ones write, e.g. my_poses.json).
CURL_PAGES = ["README.md", "docs/api.md", "docs/v2-protocol.md", "docs/deploy/docker.md"]


def section(text: str, heading: str) -> str:
    return f"\n{text}".split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    """The cells of the rows of the (one) markdown table in `text`, without its header."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not set(line) <= set("|-: ")
    ]
    return rows[1:]


def code(text: str) -> list[str]:
    """Inline code spans and the bodies of fenced blocks."""
    blocks = re.findall(r"```(?!text\n)[a-z]*\n(.*?)```", text, re.S)  # text blocks: output, not commands
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S))
    return blocks + inline


# -- settings -------------------------------------------------------------------------------------


def documented_settings() -> dict[str, str]:
    rows = table_rows(section(CONFIG, "## Service settings"))
    return {re.fullmatch(r"`(CAPSNET_\w+)`", r[0])[1]: r[1] for r in rows}  # type: ignore[index]


def parse_default(field: str, cell: str) -> Any:
    """The documented default as the setting's type would read it from the environment."""
    if field == "model_dir":
        assert cell == "the shipped model"
        return SHIPPED_MODEL
    if cell == "unset":
        return None
    if cell == "empty":
        return ""
    m = re.fullmatch(r"`([^`]*)`", cell)
    assert m, f"CAPSNET_{field.upper()}: default {cell!r} is neither `value`, empty nor unset"
    return TypeAdapter(Settings.model_fields[field].annotation).validate_python(m[1])


def test_every_setting_is_documented_with_the_codes_default():
    documented = documented_settings()
    fields = {f"CAPSNET_{f.upper()}": f for f in Settings.model_fields}
    assert sorted(set(fields) - set(documented)) == [], "settings missing from docs/configuration.md"
    assert sorted(set(documented) - set(fields)) == [], (
        "docs/configuration.md documents settings that do not exist"
    )
    wrong = {
        var: (cell, Settings.model_fields[f].default)
        for var, f in fields.items()
        if (cell := documented[var]) is not None
        and parse_default(f, cell) != Settings.model_fields[f].default
    }
    assert wrong == {}


def test_the_shipped_model_default_is_what_the_page_says():
    """The default, "the shipped model": capsnet.models when installed, else the checkout's models/."""
    assert SHIPPED_MODEL.name == "capsnet-mnist" and (SHIPPED_MODEL / "capsnet.onnx").is_file()
    assert Settings().model_dir == SHIPPED_MODEL or "CAPSNET_MODEL_DIR" in os.environ
    row = section(CONFIG, "## Service settings")
    assert "`capsnet.models`" in row and "`models/capsnet-mnist/`" in row


def test_readme_settings_are_real_and_their_defaults_match():
    rows = table_rows(section(README, "## The settings people change"))
    assert len(rows) == 7  # a short list: the rest is in docs/configuration.md
    documented = documented_settings()
    for var, default, _ in rows:
        assert documented[var.strip("`")] == default, var


def compose_variables() -> dict[str, str]:
    """Every ${NAME:-default} of docker-compose.yml with its default; none nests another."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"\$\{\w+:-\$", text)  # no fallback to a second name
    return dict(re.findall(r"\$\{(\w+):-([^}]*)\}", text))


def test_every_compose_variable_is_documented_with_composes_default():
    in_compose = compose_variables()
    rows = table_rows(section(CONFIG, "## Compose variables"))
    documented = {r[0].strip("`"): r[1].strip("`") for r in rows}
    deploy = {k: v for k, v in in_compose.items() if k.startswith("DEPLOY_")}
    assert len(deploy) == 4 and documented == deploy
    assert set(in_compose) - set(deploy) == {"CAPSNET_LOG_LEVEL"}
    # CAPSNET_LOG_LEVEL passes the service setting through, with its default
    assert in_compose["CAPSNET_LOG_LEVEL"] == Settings.model_fields["log_level"].default
    # and compose's services still read the renamed variables
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for svc in services.values():
        assert svc["environment"]["CAPSNET_MODEL_DIR"].startswith("${DEPLOY_MODEL:-")


def test_the_image_variable_is_the_dockerfiles():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    row = table_rows(section(CONFIG, "## Image variable"))
    assert [r[:2] for r in row] == [["`CAPSNET_PORT`", "`8000`"]]
    assert re.search(r"\bCAPSNET_PORT=8000\b", dockerfile)
    assert "CAPSNET_PORT" in (ROOT / "docker" / "healthcheck.py").read_text()
    assert "capsnet:gpu" not in dockerfile and "-t capsnet-service:gpu" in dockerfile


# -- routes, commands, paths ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def routes() -> set[str]:
    return set(create_app(Settings(grpc_port=0)).openapi()["paths"])


NOT_IN_OPENAPI = {"/", "/docs", "/redoc", "/openapi.json"}  # the page and the document itself


def test_every_route_is_in_the_api_page_and_every_path_there_is_a_route(routes):
    assert routes >= {"/predict", "/routing-trace", "/reconstruct", "/perturb", "/metrics"}
    table = section(API, "# HTTP API")
    assert sorted(p for p in routes if f"`{p}`" not in table) == []
    named = {p for row in table_rows(table) for p in re.findall(r"`(/[^`]*)`", row[1])}
    assert sorted(named - routes - NOT_IN_OPENAPI) == []


def test_readme_endpoint_table_has_the_main_routes(routes):
    named = {
        p for row in table_rows(section(README, "## Endpoints")) for p in re.findall(r"`(/[^`]*)`", row[1])
    }
    assert named <= routes
    assert named >= {"/predict", "/routing-trace", "/reconstruct", "/perturb", "/health/ready", "/metrics",
                     "/v2/models/{name}/infer"}  # fmt: skip


def subcommands() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_capsnet_subcommand_named_exists_and_every_one_is_documented():
    named = {
        (page.name, m)
        for page, text in TEXT.items()
        for c in code(text)
        for m in re.findall(r"(?:^|[\s/])capsnet ([a-z][a-z0-9-]*)", c, re.M)
    }
    assert sorted(n for n in named if n[1] not in subcommands()) == []
    cli_page = TEXT[ROOT / "docs" / "cli.md"]
    assert sorted(s for s in subcommands() if f"`capsnet {s}`" not in cli_page) == []


def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = {
        (page.name, m)
        for page, text in TEXT.items()
        for c in code(text)
        for m in re.findall(r"(?:^|[\s(])make ([a-z][\w-]*)", c, re.M)
    }
    assert named, "no make target found: the pattern broke"
    assert sorted(n for n in named if n[1] not in targets) == []


TOP = ("capsnet", "bench", "models", "examples", "docker", "deploy", "tests",
       "scripts", "docs", ".ci")  # fmt: skip
TOP_FILES = {"README.md", "LICENSE", "Makefile", "pyproject.toml", "setup.py", "docker-compose.yml"}
# Paths the pages name as something a command writes, not as something the repository holds.
WRITTEN = {"bench/results/latest.json", "bench/results/gpu.json", "models/capsnet-mnist/capsnet-fp16.onnx"}


def test_every_repository_path_named_exists():
    path_re = re.compile(rf"(?<![\w./-])((?:{'|'.join(map(re.escape, TOP))})/[\w./-]*)")
    missing = []
    for page, text in TEXT.items():
        for c in code(text):
            for p in path_re.findall(c):
                p = p.rstrip(".")
                if p not in WRITTEN and not (ROOT / p).exists():
                    missing.append((page.name, p))
            if c in TOP_FILES and not (ROOT / c).exists():
                missing.append((page.name, c))
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                missing.append((page.name, target))
    assert missing == []


def test_no_project_history_language():
    history = re.compile(
        r"\bissue \d+|\bsession \d|\b(?:two|second|first) sessions?\b|\blent\b|one call earlier|cubin", re.I
    )
    assert [(p.name, m[0]) for p, t in TEXT.items() for m in history.finditer(t)] == []


def test_licence_is_the_declared_one():
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


# -- figures --------------------------------------------------------------------------------------


def test_performance_page_is_what_the_generator_writes():
    assert (ROOT / "docs" / "performance.md").read_text() == render(), "run `python -m bench.report`"


def test_the_generator_notices_a_changed_figure(tmp_path):
    for p in (ROOT / "bench" / "results").glob("*.json"):
        (tmp_path / p.name).write_text(p.read_text())
    cpu = json.loads((tmp_path / "cpu-2core.json").read_text())
    cpu["raw"]["onnxruntime"][0]["p50_ms"] = 99.0
    (tmp_path / "cpu-2core.json").write_text(json.dumps(cpu))
    page = render(tmp_path)
    assert page != render() and "| onnxruntime (CPU EP) | 1 | 99.0 |" in page


def test_readme_precision_table_is_the_generated_one_and_follows_the_results(tmp_path):
    assert readme_with_table(README) == README, "run `python -m bench.report`"
    for p in (ROOT / "bench" / "results").glob("*.json"):
        (tmp_path / p.name).write_text(p.read_text())
    current = CURRENT_CPU_RUNS[0]  # the run of today's files, which the table reads
    run = json.loads((tmp_path / current).read_text())
    run["ratios"]["int8_best_vs_fp32_best"]["value"] = 9.87
    (tmp_path / current).write_text(json.dumps(run))
    assert "| 9.87× raw fp32's images/s at the best batch" in readme_with_table(README, tmp_path)


# -- the curl examples ----------------------------------------------------------------------------


def commands(text: str) -> list[str]:
    """The curl and python3 commands of the page's bash/sh blocks, continuation lines joined."""
    out: list[str] = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        acc = ""
        for line in block.splitlines():
            if not acc and (not line.strip() or line.lstrip().startswith("#")):
                continue
            acc = f"{acc}\n{line}" if acc else line
            if acc.endswith("\\"):
                continue
            try:
                shlex.split(acc, comments=True)
            except ValueError:  # an open quote: the command goes on
                continue
            if acc.startswith(("curl ", "python3 ")):
                out.append(acc)
            acc = ""
    return out


def printed_answer() -> dict[str, Any]:
    """The README's answer to its /predict curl, as printed (numbers rounded, poses shortened)."""
    block = section(README, "## Quick start").split("```json\n", 1)[1].split("```", 1)[0]
    return {
        "version": re.search(r'"version": "([^"]+)"', block)[1],  # type: ignore[index]
        "class_index": int(re.search(r'"class_index": (\d+)', block)[1]),  # type: ignore[index]
        "probability": float(re.search(r'"probability": ([\d.]+)', block)[1]),  # type: ignore[index]
        "probabilities": json.loads(re.search(r'"probabilities": (\[[^\]]*\])', block)[1]),  # type: ignore[index]
        "pose7": json.loads(
            re.search(r"\.\.\., (\[-?[\d.]+, -?[\d.]+, -?[\d.]+, -?[\d.]+),", block)[1] + "]"
        ),  # type: ignore[index]
    }


def test_curl_examples_run_against_the_service(tmp_path):
    cmds = [(page, c) for page in CURL_PAGES for c in commands((ROOT / page).read_text())]
    assert sum(c.startswith("curl ") for _, c in cmds) >= 10
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
    }
    with serve(Settings(grpc_port=0)) as url:
        outputs = {}
        for page, c in cmds:
            here = re.sub(r"\bcurl ", "curl -sS --fail ", c.replace("localhost:8000", url))
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", here], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
            assert r.returncode == 0, f"{page}: {c}\n{r.stderr}"
            outputs.setdefault(c, r.stdout)
    first = commands(README)[0]
    got = json.loads(outputs[first])
    want, p = printed_answer(), got["predictions"][0]
    assert got["model"] == {"name": "capsnet-mnist", "version": want["version"]}
    assert p["class_index"] == want["class_index"] and round(p["probability"], 3) == want["probability"]
    assert [round(x, 3) for x in p["probabilities"]] == want["probabilities"]
    assert [round(x, 3) for x in p["poses"][7][:4]] == want["pose7"]
    # the files the examples write are what they say
    for png in ("reconstruction.png", "perturb.png", "routing.png", "edited.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert len(json.loads((tmp_path / "my_poses.json").read_text())["poses"]) == 10
    digits = json.loads((tmp_path / "my_digits.json").read_text())["images"]
    assert [len(digits), len(digits[0]), len(digits[0][0])] == [2, 28, 28]
    answer = json.loads(outputs[next(c for _, c in cmds if "@my_digits.json" in c)])
    assert [q["class_index"] for q in answer["predictions"]] == [7, 3]
    # v2: the answer printed under the infer command is the one the service gives
    v2 = json.loads(outputs[next(c for _, c in cmds if "/v2/models/capsnet-mnist/infer" in c)])
    printed = re.search(r'"data":\[([\d.]+),([\d.]+),', (ROOT / "docs" / "v2-protocol.md").read_text())
    assert printed, "docs/v2-protocol.md lost its printed v2 answer"
    assert v2["outputs"][0]["data"][:2] == pytest.approx([float(printed[1]), float(printed[2])], abs=1e-6)


def test_capsnet_predict_row_is_what_the_command_prints():
    """docs/cli.md prints the JSON row of `capsnet predict` for examples/7.png: it is the command's."""
    printed = next(
        json.loads(line)
        for line in (ROOT / "docs" / "cli.md").read_text().splitlines()
        if line.startswith('{"file":"examples/7.png"')
    )
    r = subprocess.run([sys.executable, "-m", "capsnet", "predict", "examples/7.png"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[0])
    assert {k: got[k] for k in ("file", "class_index", "label")} == {
        k: printed[k] for k in ("file", "class_index", "label")
    }
    assert got["probabilities"] == pytest.approx(printed["probabilities"], abs=1e-6)


def test_every_metric_named_exists():
    source = (ROOT / "capsnet" / "service" / "metrics.py").read_text()
    not_metrics = {"capsnet_service"}  # the wheel's file name
    named = {m for text in TEXT.values() for c in code(text) for m in re.findall(r"\bcapsnet_[a-z_]+", c)}
    named -= not_metrics
    assert len(named) >= 8
    assert sorted(m for m in named if f'"{m}"' not in source) == []
