"""deploy/: manifests valid for Kubernetes and consistent with the service; sound Dockerfiles.

Consistent means: probes on /health and /ready, grace period covering the drain, keys from the
Secret, presets from the ConfigMap's adapters.yaml, Service and monitors on the right port.
"""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from helpers import ROOT
from registry.config import parse_registry
from registry.registry import AdapterRegistry
from service.settings import Settings

K8S = ROOT / "deploy" / "k8s"
#: the oldest Kubernetes minor still in upstream support when this was written
K8S_VERSION = "1.32.0"
#: Prometheus Operator kinds: CRDs, whose schemas kubernetes-validate does not ship; they get
#: the structural checks in `test_monitors_scrape_the_service_port_with_the_api_key` instead
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}
PRESTOP_S = 5


def documents() -> list[tuple[str, dict[str, Any]]]:
    """Every YAML document under deploy/k8s, with its file name."""
    out: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        out.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def of_kind(kind: str) -> list[dict[str, Any]]:
    """The documents of one kind."""
    return [doc for _, doc in documents() if doc["kind"] == kind]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """The env entries of a container, by name."""
    return {e["name"]: e for e in container.get("env", [])}


def test_manifests_exist_for_every_part() -> None:
    """Deployments (CPU, GPU, multi-GPU), Service, Secret, ConfigMap, PDB and monitors exist."""
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds.count("Deployment") == 3
    for kind in ("Service", "Secret", "ConfigMap", "PodDisruptionBudget", *CRD_KINDS):
        assert kind in kinds


@pytest.mark.parametrize(
    ("name", "doc"), documents(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_manifest_is_valid_against_kubernetes_schemas(name: str, doc: dict[str, Any]) -> None:
    """Each built-in resource validates (strict: unknown fields refused) against Kubernetes'."""
    if doc["kind"] in CRD_KINDS:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_bad_manifest_is_refused() -> None:
    """The validator is real: a misspelt field in a Deployment fails."""
    bad = of_kind("Deployment")[0]
    bad = {**bad, "spec": {**bad["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_probes_drain_and_grace_agree_with_the_service() -> None:
    """Probes hit /health and /ready; grace >= preStop + drain + 10 s; drain default is met."""
    for deployment in of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["startupProbe"]["httpGet"]["path"] == "/health"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_S)]
        drain = float(env_of(container)["IW_DRAIN_TIMEOUT_S"]["value"])
        assert pod["terminationGracePeriodSeconds"] >= PRESTOP_S + drain + 10
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["ports"][0] == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    # the manifests say 20 s explicitly; the service's default must not exceed what they allow
    assert Settings().drain_timeout_s <= 30


def test_keys_come_from_the_secret_and_presets_from_the_configmap() -> None:
    """Every secretKeyRef names a Secret key; each IW_PRELOAD is a preset of the ConfigMap."""
    (secret,) = of_kind("Secret")
    (config_map,) = of_kind("ConfigMap")
    text = config_map["data"]["adapters.yaml"]
    registry = AdapterRegistry(parse_registry(text, "configmap"), use_entry_points=False)
    for deployment in of_kind("Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = env_of(container)
        for name in ("IW_ADMIN_KEY", "IW_API_KEY"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret["stringData"]
        assert env["IW_PRELOAD"]["value"] in registry.presets
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert {
            "name": "adapters",
            "configMap": {"name": config_map["metadata"]["name"]},
        } in volumes
    multi = registry.preset("big-model-4gpu").engine_params
    assert multi["tensor_parallel_size"] * multi["pipeline_parallel_size"] == 4


def test_service_selects_every_deployment() -> None:
    """The Service's selector matches the pods of every Deployment and targets the http port."""
    (service,) = of_kind("Service")
    selector = service["spec"]["selector"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    for deployment in of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_no_deployment_selects_another_deployments_pods() -> None:
    """Each Deployment's selector matches its own pods only (overlapping controllers fight)."""
    deployments = of_kind("Deployment")
    for deployment in deployments:
        selector = deployment["spec"]["selector"]["matchLabels"].items()
        for other in deployments:
            if other is not deployment:
                assert not selector <= other["spec"]["template"]["metadata"]["labels"].items()


def test_the_two_monitors_are_alternatives_in_files_of_their_own() -> None:
    """ServiceMonitor and PodMonitor never come in one file: both applied scrape pods twice."""
    for path in sorted(K8S.glob("*.yaml")):
        kinds = {doc["kind"] for doc in yaml.safe_load_all(path.read_text()) if doc}
        assert not kinds >= CRD_KINDS, path.name


def test_monitors_scrape_the_service_port_with_the_api_key() -> None:
    """ServiceMonitor/PodMonitor (CRDs, not schema-checked): right port, path and Secret key."""
    (service,) = of_kind("Service")
    (secret,) = of_kind("Secret")
    port = service["spec"]["ports"][0]["name"]
    for kind, key in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        (monitor,) = of_kind(kind)
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items()
        )
        (endpoint,) = monitor["spec"][key]
        assert endpoint["port"] == port
        assert endpoint["path"] == "/metrics"
        credentials = endpoint["authorization"]["credentials"]
        assert credentials["name"] == secret["metadata"]["name"]
        assert credentials["key"] == "IW_API_KEY"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_runs_as_a_user_and_execs_the_server(name: str) -> None:
    """Base image as a build arg; non-root USER, EXPOSE, HEALTHCHECK, IW_HOST=0.0.0.0, exec."""
    text = (ROOT / "deploy" / name).read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+\nFROM \$\{BASE_IMAGE\}$", text, re.MULTILINE)
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    assert re.search(r"^EXPOSE 8000$", text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.MULTILINE)
    assert "IW_HOST=0.0.0.0" in text
    assert 'ENTRYPOINT ["/usr/local/bin/iw-entrypoint"]' in text
    entrypoint = (ROOT / "deploy" / "entrypoint.sh").read_text()
    assert "exec inference-wrapper" in entrypoint


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_copies_every_package_the_project_installs(name: str) -> None:
    """Each package pyproject installs is copied into the image (hooks/ once was not)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    found = re.search(r"^include = \[(.*)\]$", pyproject, re.MULTILINE)
    assert found is not None
    packages = re.findall(r'"(\w+)\*"', found.group(1))
    assert "hooks" in packages
    dockerfile = (ROOT / "deploy" / name).read_text()
    missing = [p for p in packages if f"COPY {p}/ {p}/" not in dockerfile]
    assert missing == []
