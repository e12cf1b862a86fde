"""deploy/: manifests parse, kustomize references resolve, settings and metric names exist."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from pydantic_settings import BaseSettings

import schemas.settings as settings_module

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
METRICS_MODULES = ("streams.metrics", "workers.metrics")
# Prometheus' own series, allowed next to ours in alert expressions.
BUILTIN_SERIES = {"up"}
# Environment names read by click options rather than settings classes.
CLI_ENV = {"RELATA_LOG_LEVEL"}


def _yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_objects() -> Iterator[dict[str, Any]]:
    for path in sorted((K8S / "base").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            yield from _docs(path)


def _workloads() -> list[dict[str, Any]]:
    return [o for o in _k8s_objects() if o["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict)


def test_every_json_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.json"))
    assert files
    for path in files:
        assert isinstance(json.loads(path.read_text()), dict)


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


@pytest.mark.parametrize("path", _kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_references_existing_files(path: Path) -> None:
    spec = _docs(path)[0]
    assert spec["kind"] == "Kustomization"
    refs = list(spec.get("resources", [])) + [
        p["path"] for p in spec.get("patches", []) if "path" in p
    ]
    assert refs
    for ref in refs:
        target = (path.parent / ref).resolve()
        assert target.exists(), f"{path}: {ref} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), (
                f"{path}: {ref} is not a kustomization"
            )


def test_base_lists_every_manifest_in_its_directory() -> None:
    base = K8S / "base"
    listed = set(_docs(base / "kustomization.yaml")[0]["resources"])
    present = {p.name for p in base.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_objects_are_complete_and_unique() -> None:
    seen = set()
    for obj in _k8s_objects():
        key = (obj["kind"], obj["metadata"]["name"])
        assert obj.get("apiVersion"), key
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
    kinds = {kind for kind, _ in seen}
    expected = {
        "Namespace", "ConfigMap", "Secret", "StatefulSet", "Deployment", "Service",
        "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor",
    }  # fmt: skip
    assert expected <= kinds


def test_workloads_select_their_pods_and_probe_declared_ports() -> None:
    workloads = _workloads()
    assert {w["metadata"]["name"] for w in workloads} == {
        "relata-streams", "relata-associations", "relata-indexer", "relata-recommender",
    }  # fmt: skip
    for workload in workloads:
        template = workload["spec"]["template"]
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items()
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            ports = {p["name"] for p in container["ports"]}
            assert container["resources"]["requests"] and container["resources"]["limits"]
            for probe in ("readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"]["port"] in ports, (workload, probe)
            annotations = template["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            port_numbers = {str(p["containerPort"]) for p in container["ports"]}
            assert annotations["prometheus.io/port"] in port_numbers


def test_probes_are_readiness_and_liveness_and_the_grace_period_fits_the_pod() -> None:
    """Readiness is /readyz (not ready while the broker is away), liveness /livez (stuck
    only; an outage never restarts a pod), and every process stops within
    RELATA_SHUTDOWN_GRACE_S, below its pod's terminationGracePeriodSeconds."""
    from schemas.settings import ReliabilitySettings

    (config,) = [o for o in _k8s_objects() if o["kind"] == "ConfigMap"]
    grace = float(config["data"].get("RELATA_SHUTDOWN_GRACE_S", "nan"))
    assert grace == grace, "the configmap sets RELATA_SHUTDOWN_GRACE_S"  # not NaN
    assert ReliabilitySettings().shutdown_grace_s < 30  # below Kubernetes' default period
    for workload in _workloads():
        pod = workload["spec"]["template"]["spec"]
        assert grace < pod.get("terminationGracePeriodSeconds", 30), workload["metadata"]["name"]
        for container in pod["containers"]:
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
            # Start-up is /metrics: it answers once the process runs, ready or not.
            assert container["startupProbe"]["httpGet"]["path"] == "/metrics"


def test_worker_roles_are_indexer_and_recommender() -> None:
    roles = {
        w["metadata"]["name"]: w["spec"]["template"]["spec"]["containers"][0]["args"]
        for w in _workloads()
    }
    assert roles["relata-indexer"] == ["workers", "--role", "indexer"]
    assert roles["relata-recommender"] == ["workers", "--role", "recommender"]
    assert roles["relata-streams"] == ["streams"]
    assert roles["relata-associations"] == ["streams"]
    stream_roles = {
        w["metadata"]["name"]: {
            e["name"]: e.get("value") for e in w["spec"]["template"]["spec"]["containers"][0]["env"]
        }["RELATA_STREAMS_ROLE"]
        for w in _workloads()
        if w["metadata"]["name"] in ("relata-streams", "relata-associations")
    }
    assert stream_roles == {"relata-streams": "profiles", "relata-associations": "associations"}


def test_services_pdbs_and_hpa_point_at_workloads() -> None:
    objects = list(_k8s_objects())
    workloads = _workloads()

    def pods_matching(selector: dict[str, str]) -> list[dict[str, Any]]:
        return [
            w for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]  # fmt: skip

    for obj in objects:
        if obj["kind"] == "Service":
            matched = pods_matching(obj["spec"]["selector"])
            assert matched, obj["metadata"]["name"]
            container_ports = {
                p["name"] for w in matched for c in w["spec"]["template"]["spec"]["containers"]
                for p in c["ports"]
            }  # fmt: skip
            for port in obj["spec"]["ports"]:
                assert port["targetPort"] in container_ports
        if obj["kind"] == "PodDisruptionBudget":
            assert pods_matching(obj["spec"]["selector"]["matchLabels"]), obj["metadata"]["name"]
        if obj["kind"] == "HorizontalPodAutoscaler":
            ref = obj["spec"]["scaleTargetRef"]
            assert any(
                w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"] for w in workloads
            )
    for stateful in (w for w in workloads if w["kind"] == "StatefulSet"):
        assert stateful["spec"]["serviceName"] in {
            o["metadata"]["name"] for o in objects if o["kind"] == "Service"
        }


def _settings_env_names() -> set[str]:
    names = set(CLI_ENV)
    for _, cls in inspect.getmembers(settings_module, inspect.isclass):
        if issubclass(cls, BaseSettings) and cls.__module__ == settings_module.__name__:
            prefix = str(cls.model_config.get("env_prefix", ""))
            names |= {f"{prefix}{field}".upper() for field in cls.model_fields}
    return names


def test_every_relata_env_name_is_a_real_setting() -> None:
    known = _settings_env_names()
    used: set[str] = set()
    for obj in _k8s_objects():
        if obj["kind"] == "ConfigMap":
            used |= set(obj["data"])
        if obj["kind"] == "Secret":
            used |= set(obj["stringData"])
    for path in [*K8S.rglob("*.yaml")]:
        used |= set(re.findall(r"name: (RELATA_[A-Z0-9_]+)", path.read_text()))
    assert used
    assert used <= known, f"unknown settings: {sorted(used - known)}"


def _metric_builders(module: Any) -> list[Any]:
    """Callables of a metrics module that build its metrics from a registry."""
    builders = []
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) and callable(getattr(obj, "create", None)):
            builders.append(obj.create)
        elif (
            inspect.isfunction(obj)
            and not name.startswith("_")
            and "registry" in inspect.signature(obj).parameters
        ):
            builders.append(obj)
    return builders


def _exported_series() -> set[str]:
    """Every series name (with _total/_bucket/... suffixes) the metrics modules register."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("", "_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for module_name in METRICS_MODULES:
        module = importlib.import_module(module_name)
        builders = _metric_builders(module)
        assert builders, f"{module_name}: no metrics builder taking a registry found"
        for build in builders:
            registry = CollectorRegistry()
            build(registry=registry)
            for family in registry.collect():
                names |= {family.name + s for s in suffixes.get(family.type, ("",))}
                names.add(family.name)
    return names


def _referenced_metrics() -> dict[str, set[str]]:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    dashboard = json.loads((DEPLOY / "grafana" / "relata.json").read_text())
    alert_exprs = [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    panel_exprs = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    pattern = re.compile(r"\brelata_[a-z0-9_]+")
    return {
        "alerts": {m for e in alert_exprs for m in pattern.findall(e)},
        "dashboard": {m for e in panel_exprs for m in pattern.findall(e)},
    }


def test_alerts_and_dashboard_use_only_exported_metric_names() -> None:
    exported = _exported_series()
    for source, names in _referenced_metrics().items():
        assert names, source
        assert names <= exported, f"{source} uses unknown metrics: {sorted(names - exported)}"


def test_alerts_and_dashboard_use_only_documented_metric_names() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    section = operations.split("## Metric names", 1)[1].split("\n## ", 1)[0]
    families = set(re.findall(r"`(relata_[a-z0-9_]+)", section))
    assert len(families) >= 20
    for source, names in _referenced_metrics().items():
        unknown = {
            n for n in names
            if n not in families and re.sub(r"_(bucket|sum|count)$", "", n) not in families
        }  # fmt: skip
        assert not unknown, f"{source} uses metrics not in docs/operations.md: {sorted(unknown)}"


def test_alert_rules_are_complete() -> None:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = set()
    for group in alerts["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= rule.keys(), rule
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"]
            names.add(rule["alert"])
            series = set(re.findall(r"\b([a-z_]+)(?=[{\[])", rule["expr"]))
            assert series <= BUILTIN_SERIES | {s for s in series if s.startswith("relata_")}
    assert len(names) == sum(len(g["rules"]) for g in alerts["groups"]), "duplicate alert names"


def test_dashboard_panels_have_unique_ids_and_queries() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "relata.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]


def test_dockerfile_is_non_root_and_copies_existing_paths() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "python:3.11-slim" in text
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and not users[-1].startswith(("root", "0"))
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        for src in line.split()[:-1]:
            if src != "README.md":  # the lead's file; pyproject.toml names it as the readme
                assert (ROOT / src).exists(), src


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("overlay", ["", "overlays/gpu-indexer"])
def test_kustomize_renders(overlay: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    rendered = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    namespaced = [d for d in rendered if d["kind"] != "Namespace"]
    assert all(d["metadata"]["namespace"] == "relata" for d in namespaced)
    indexer = next(d for d in rendered if d["metadata"]["name"] == "relata-indexer"
                   and d["kind"] == "Deployment")  # fmt: skip
    limits = indexer["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == (overlay == "overlays/gpu-indexer")
