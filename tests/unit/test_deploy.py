"""deploy/: manifests parse, render and validate against the Kubernetes and CRD schemas, each
pod is scraped once, generated files are current, settings and metric names exist, and the
alert rules pass promtool's checks and unit tests."""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry
from pydantic_settings import BaseSettings

import schemas.quality_settings as quality_settings_module
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


def _component_dirs() -> set[Path]:
    return {p.parent for p in _kustomizations() if _docs(p)[0]["kind"] == "Component"}


@pytest.mark.parametrize("path", _kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_references_existing_files(path: Path) -> None:
    spec = _docs(path)[0]
    assert spec["kind"] in ("Kustomization", "Component")
    refs = (
        list(spec.get("resources", []))
        + list(spec.get("components", []))
        + [p["path"] for p in spec.get("patches", []) if "path" in p]
    )
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
        "relata-quality",
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
    assert roles["relata-quality"] == ["workers", "--role", "quality"]
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
    for module in (settings_module, quality_settings_module):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseSettings) and cls.__module__ == module.__name__:
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


# --- rendered overlays -------------------------------------------------------------------------

# Every directory `kubectl apply -k` is meant for: the default (Strimzi + KEDA) and its overlays.
OVERLAYS = ["", "overlays/plain", "overlays/gpu-indexer"]
needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed"
)
CRD_SCHEMAS = ROOT / "tests" / "data" / "crd-schemas"
# Kubernetes version whose schemas (shipped by kubernetes-validate) the manifests must satisfy.
K8S_VERSION = kubernetes_validate.latest_version()


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def _of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def test_overlays_list_every_deployable_kustomization() -> None:
    deployable = {
        str(p.parent.relative_to(K8S)).replace(".", "")
        for p in _kustomizations()
        if p.parent not in _component_dirs() and p.parent != K8S / "base"
    }
    assert deployable == set(OVERLAYS)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders(overlay: str) -> None:
    rendered = _render(overlay)
    namespaced = [d for d in rendered if d["kind"] != "Namespace"]
    assert all(d["metadata"]["namespace"] == "relata" for d in namespaced)
    indexer = next(d for d in rendered if d["metadata"]["name"] == "relata-indexer"
                   and d["kind"] == "Deployment")  # fmt: skip
    limits = indexer["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == (overlay == "overlays/gpu-indexer")
    operators = overlay != "overlays/plain"
    assert bool(_of_kind(rendered, "ScaledObject")) == operators
    assert bool(_of_kind(rendered, "KafkaTopic")) == operators
    # KEDA owns the recommender's HPA where it runs; the plain overlay keeps the CPU HPA.
    assert bool(_of_kind(rendered, "HorizontalPodAutoscaler")) == (not operators)


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the fields, as the API server
    does with strict field validation (and `kubectl apply --validate=strict`)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


def _crd_schema(obj: dict[str, Any]) -> dict[str, Any] | None:
    group, _, version = obj["apiVersion"].rpartition("/")
    path = CRD_SCHEMAS / f"{group}_{version}_{obj['kind']}.yaml"
    return _strict(yaml.safe_load(path.read_text())) if path.exists() else None


def _validate(obj: dict[str, Any]) -> None:
    schema = _crd_schema(obj)
    if schema is not None:
        jsonschema.Draft7Validator(schema).validate(obj)
        return
    group = obj["apiVersion"].rpartition("/")[0]
    # Core groups have no dot (apps, policy, autoscaling) or end in .k8s.io; others are CRDs.
    assert "." not in group or group.endswith(".k8s.io"), (
        f"{obj['apiVersion']} {obj['kind']}: no CRD schema under tests/data/crd-schemas"
    )
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_validate_against_their_schemas(overlay: str) -> None:
    """Core objects against Kubernetes' own schemas, KEDA, Strimzi and Prometheus Operator
    objects against their CRDs' schemas; unknown fields are errors in both."""
    rendered = _render(overlay)
    custom = {o["kind"] for o in rendered if _crd_schema(o) is not None}
    assert "ServiceMonitor" in custom
    if overlay != "overlays/plain":
        assert {"ScaledObject", "TriggerAuthentication", "KafkaTopic", "KafkaUser"} <= custom
    for obj in rendered:
        _validate(obj)


@needs_kubectl
def test_schema_validation_refuses_misspelt_and_invalid_fields() -> None:
    scaled = next(o for o in _render("") if o["kind"] == "ScaledObject")
    wrong_field = {**scaled, "spec": {**scaled["spec"], "maxReplicas": 3}}
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        _validate(wrong_field)
    topic = next(o for o in _render("") if o["kind"] == "KafkaTopic")
    with pytest.raises(jsonschema.ValidationError):
        _validate({**topic, "spec": {**topic["spec"], "partitions": 0}})
    deployment = next(o for o in _render("") if o["kind"] == "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate({**deployment, "spec": {**deployment["spec"], "replica": 2}})


# --- scraping ----------------------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _scrapes(objects: tuple[dict[str, Any], ...]) -> dict[str, list[str]]:
    """Workload -> the jobs (Service names) that scrape its pods, as the Prometheus Operator
    builds targets: ServiceMonitor -> selected Services -> endpoints on a named Service port
    -> the pods behind the Service."""
    services = _of_kind(objects, "Service")
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    jobs: dict[str, list[str]] = {w["metadata"]["name"]: [] for w in workloads}
    for monitor in _of_kind(objects, "ServiceMonitor"):
        spec = monitor["spec"]
        namespaces = spec.get("namespaceSelector", {}).get(
            "matchNames", [monitor["metadata"]["namespace"]]
        )
        for service in services:
            if service["metadata"]["namespace"] not in namespaces:
                continue
            if not _selects(spec["selector"], service["metadata"].get("labels", {})):
                continue
            port_names = {p.get("name") for p in service["spec"]["ports"]}
            for endpoint in spec["endpoints"]:
                if endpoint["port"] not in port_names:
                    continue
                for workload in workloads:
                    labels = workload["spec"]["template"]["metadata"]["labels"]
                    if _selects({"matchLabels": service["spec"]["selector"]}, labels):
                        jobs[workload["metadata"]["name"]].append(service["metadata"]["name"])
    return jobs


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_pod_is_scraped_exactly_once_under_its_component_job(overlay: str) -> None:
    assert _scrapes(_render(overlay)) == {
        name: [name]
        for name in (
            "relata-streams",
            "relata-associations",
            "relata-indexer",
            "relata-recommender",
            "relata-quality",
        )
    }


@needs_kubectl
def test_scrape_check_sees_a_selector_that_also_matches_the_headless_services() -> None:
    """The selector relata had before matched the StatefulSets' headless Services too."""
    objects = list(_render(""))
    monitor = _of_kind(tuple(objects), "ServiceMonitor")[0]
    loose = {
        **monitor,
        "spec": {
            **monitor["spec"],
            "selector": {"matchLabels": {"app.kubernetes.io/name": "relata"}},
        },
    }
    objects[objects.index(monitor)] = loose
    jobs = _scrapes(tuple(objects))
    assert sorted(jobs["relata-streams"]) == ["relata-streams", "relata-streams-headless"]


# --- Strimzi and KEDA --------------------------------------------------------------------------


def _configmap() -> dict[str, str]:
    (config,) = [o for o in _k8s_objects() if o["kind"] == "ConfigMap"]
    data: dict[str, str] = config["data"]
    return data


def test_generated_files_are_current() -> None:
    from relata.cli.deploy_manifests import render_all

    for path, text in render_all(DEPLOY).items():
        assert (DEPLOY / path).read_text() == text, (
            f"deploy/{path} is stale: run `relata deploy-manifests`"
        )


@needs_kubectl
def test_topics_are_the_declared_ones_sized_by_the_configmap() -> None:
    from schemas.topics import ALL_TOPICS

    config = _configmap()
    prefix = config.get("RELATA_KAFKA_TOPIC_PREFIX", "")
    topics = {t["spec"]["topicName"]: t["spec"] for t in _of_kind(_render(""), "KafkaTopic")}
    assert set(topics) == {prefix + spec.name for spec in ALL_TOPICS}
    for spec in ALL_TOPICS:
        topic = topics[prefix + spec.name]
        assert topic["partitions"] == int(config["RELATA_KAFKA_PARTITIONS"])
        assert topic["replicas"] == int(config["RELATA_KAFKA_REPLICATION_FACTOR"])
        assert topic["config"]["cleanup.policy"] == spec.cleanup_policy


# Which component's principal each workload logs in as.
WORKLOAD_COMPONENT = {
    "relata-streams": "streams",
    "relata-associations": "streams",
    "relata-indexer": "indexer",
    "relata-recommender": "recommender",
    "relata-quality": "quality",
}


@needs_kubectl
def test_each_workload_logs_in_as_its_components_kafka_user_with_its_acls() -> None:
    from relata.cli.deploy_manifests import quality_from_configmap, settings_from_configmap
    from schemas.access import component_access

    kafka, streams, indexer, recommender = settings_from_configmap(_configmap())
    quality = quality_from_configmap(_configmap())
    access = component_access(
        kafka, streams=streams, indexer=indexer, recommender=recommender, quality=quality
    )
    rendered = _render("")
    users = {u["metadata"]["name"]: u for u in _of_kind(rendered, "KafkaUser")}
    assert _configmap()["RELATA_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    for workload in (o for o in rendered if o["kind"] in ("Deployment", "StatefulSet")):
        grants = access[WORKLOAD_COMPONENT[workload["metadata"]["name"]]]  # type: ignore[index]
        env = {e["name"]: e for e in workload["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["RELATA_KAFKA_SASL_USERNAME"]["value"] == grants.principal
        secret = env["RELATA_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        user = users[secret["name"]]
        assert (secret["key"], user["spec"]["authentication"]["type"]) == (
            "password",
            "scram-sha-512",
        )
        acls = {
            (a["resource"]["type"], a["resource"]["name"], a["resource"]["patternType"]):
                {op.upper() for op in a["operations"]}
            for a in user["spec"]["authorization"]["acls"]
        }  # fmt: skip
        assert acls == {
            (g.resource, g.name, "prefix" if g.prefixed else "literal"):
                {op.replace("_", "") for op in g.operations}
            for g in grants.grants
        }  # fmt: skip


@needs_kubectl
def test_scaled_objects_follow_their_consumer_groups_bounded_by_partitions() -> None:
    from relata.cli.deploy_manifests import settings_from_configmap
    from schemas.topics import BEHAVIOR_EVENTS, PROFILE_UPDATES
    from streams.naming import events_group

    config = _configmap()
    kafka, streams, _, recommender = settings_from_configmap(config)
    rendered = _render("")
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in _of_kind(rendered, "ScaledObject")}
    expected = {
        "relata-streams": (
            "StatefulSet",
            events_group(kafka, streams.model_copy(update={"role": "profiles"})),
            BEHAVIOR_EVENTS,
        ),
        "relata-recommender": ("Deployment", recommender.group_id, PROFILE_UPDATES),
    }
    assert set(scaled) == set(expected)
    auths = {a["metadata"]["name"] for a in _of_kind(rendered, "TriggerAuthentication")}
    for name, (kind, group, topic) in expected.items():
        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"]["kind"] == kind
        assert any(o["kind"] == kind and o["metadata"]["name"] == name for o in rendered)
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= kafka.partitions
        (lag,) = [t for t in spec["triggers"] if t["type"] == "kafka"]
        assert lag["metadata"]["consumerGroup"] == group
        assert lag["metadata"]["topic"] == kafka.topic(topic.name)
        assert lag["metadata"]["bootstrapServers"] == config["RELATA_KAFKA_BOOTSTRAP_SERVERS"]
        assert lag["authenticationRef"]["name"] in auths
        assert int(lag["metadata"]["lagThreshold"]) > 0


# --- alerts, runbook, dashboard ----------------------------------------------------------------

PROMETHEUS = DEPLOY / "prometheus"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)",
)


def _alert_rules() -> list[dict[str, Any]]:
    alerts = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in alerts["groups"] for rule in group["rules"]]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, check=False, cwd=PROMETHEUS
    )


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    out = _promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in out.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    out = _promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_fail_when_an_alert_is_broken(tmp_path: Path) -> None:
    """The unit tests catch a rule that no longer fires: raise every threshold out of reach."""
    broken = (PROMETHEUS / "alerts.yml").read_text().replace("> 0.05", "> 50")
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path)
    out = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode != 0
    assert "RelataDeadLetterRateHigh" in out.stdout + out.stderr


def test_every_alert_pages_on_one_series_and_stays_silent_on_another() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fires: set[str] = set()
    silent: set[str] = set()
    for test in tests:
        for case in test["alert_rule_test"]:
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
            # A silent case proves something only if the series exist at all.
            assert test["input_series"], test["name"]
    names = {rule["alert"] for rule in _alert_rules()}
    assert fires == names, f"no paging test: {sorted(names - fires)}"
    assert silent == names, f"no silent test: {sorted(names - silent)}"


def _runbook_anchors() -> set[str]:
    text = (DEPLOY / "RUNBOOK.md").read_text()
    return {heading.strip().lower() for heading in re.findall(r"^## (.+)$", text, flags=re.M)}


def test_every_alert_has_a_runbook_section_and_url() -> None:
    anchors = _runbook_anchors()
    for rule in _alert_rules():
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page.endswith("deploy/RUNBOOK.md"), url
        assert anchor == rule["alert"].lower() and anchor in anchors, (rule["alert"], url)
    assert anchors == {rule["alert"].lower() for rule in _alert_rules()}, (
        "runbook sections without alerts"
    )


def test_freshness_slo_matches_the_histogram_and_the_alerts() -> None:
    from relata.deploy.slo import FRESHNESS_OBJECTIVE_SECONDS, FRESHNESS_TARGET
    from workers.metrics import EVENT_TO_RECOMMENDATION_BUCKETS

    # The share of fast recommendations is read from the bucket at the objective.
    assert FRESHNESS_OBJECTIVE_SECONDS in EVENT_TO_RECOMMENDATION_BUCKETS
    exprs = {rule["alert"]: rule["expr"] for rule in _alert_rules()}
    assert f"> {FRESHNESS_OBJECTIVE_SECONDS:g}" in exprs["RelataRecommendationLatencyHigh"]
    burn = exprs["RelataFreshnessBudgetBurn"]
    assert f'le="{FRESHNESS_OBJECTIVE_SECONDS:g}"' in burn
    assert f"* {1 - FRESHNESS_TARGET:g}" in burn


def test_dashboard_shows_the_freshness_slo() -> None:
    from relata.deploy.slo import FRESHNESS_OBJECTIVE_SECONDS

    dashboard = json.loads((DEPLOY / "grafana" / "relata.json").read_text())
    panels = {p["title"]: p for p in dashboard["panels"]}
    p99 = [p for t, p in panels.items() if t.startswith("p99 event → recommendation")]
    assert p99
    for panel in p99:
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert FRESHNESS_OBJECTIVE_SECONDS in [s["value"] for s in steps]
        assert "histogram_quantile(0.99" in panel["targets"][0]["expr"]
    budget = next(p for t, p in panels.items() if t.startswith("Error budget left"))
    assert 'le="0.25"' in budget["targets"][0]["expr"]
    for panel in dashboard["panels"]:
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert all(refs) and len(refs) == len(set(refs)), panel["title"]
