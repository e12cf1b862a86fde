"""Strimzi `KafkaTopic` and `KafkaUser` objects from `schemas.topics` and `schemas.access`.

Topics are declared once, in `schemas/topics.py`; their partitions, replication and prefix
come from the settings the processes read (deploy/k8s/base/configmap.yaml), and each
component's ACLs are exactly the grants `schemas.access` declares for it, the ones the
embedded broker enforces and the start-up check compares.
"""

from __future__ import annotations

import re
from typing import Any

from schemas.access import Access, Component, Grant, component_access
from schemas.quality_settings import QualitySettings
from schemas.settings import IndexerSettings, KafkaSettings, RecommenderSettings, StreamsSettings
from schemas.topics import ALL_TOPICS

# KafkaTopic served by every Strimzi release since 0.22; KafkaUser v1 (the `operations` list)
# since 0.49.
TOPIC_API_VERSION = "kafka.strimzi.io/v1beta2"
USER_API_VERSION = "kafka.strimzi.io/v1"
# The components that run in the cluster, each with its own KafkaUser. `workers` (indexer and
# recommender in one process) and `tools` (the CLI run by hand) are not deployed.
DEPLOYED: tuple[Component, ...] = ("streams", "indexer", "recommender", "quality")
# Strimzi spells Kafka's operations in CamelCase.
_OPERATIONS = {
    "READ": "Read",
    "WRITE": "Write",
    "CREATE": "Create",
    "DESCRIBE": "Describe",
    "DESCRIBE_CONFIGS": "DescribeConfigs",
}


def resource_name(name: str) -> str:
    """A Kubernetes object name (RFC 1123 subdomain) for a Kafka name, which may hold `_` or
    upper case; the Kafka name itself goes into `topicName` / `userName`."""
    cleaned = re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-.")
    return cleaned or "relata"


def kafka_topics(kafka: KafkaSettings, *, cluster: str) -> list[dict[str, Any]]:
    """One KafkaTopic per declared topic: prefixed name, the settings' partitions and
    replication, the spec's cleanup policy (what `relata.runtime.topics` would create)."""
    return [
        {
            "apiVersion": TOPIC_API_VERSION,
            "kind": "KafkaTopic",
            "metadata": {
                "name": resource_name(kafka.topic(spec.name)),
                "labels": {"strimzi.io/cluster": cluster},
                "annotations": {"relata/description": spec.description, "relata/key": spec.key},
            },
            "spec": {
                "topicName": kafka.topic(spec.name),
                "partitions": kafka.partitions,
                "replicas": kafka.replication_factor,
                "config": {"cleanup.policy": spec.cleanup_policy},
            },
        }
        for spec in ALL_TOPICS
    ]


def _acl(grant: Grant) -> dict[str, Any]:
    return {
        "type": "allow",
        "resource": {
            "type": grant.resource,
            "name": grant.name,
            "patternType": "prefix" if grant.prefixed else "literal",
        },
        "operations": sorted(_OPERATIONS[op] for op in grant.operations),
    }


def kafka_user(access: Access, *, cluster: str) -> dict[str, Any]:
    """A SCRAM-SHA-512 KafkaUser named after the component's principal, with its grants as
    ACLs. The User Operator writes its password to a Secret of the same name."""
    return {
        "apiVersion": USER_API_VERSION,
        "kind": "KafkaUser",
        "metadata": {
            "name": resource_name(access.principal),
            "labels": {"strimzi.io/cluster": cluster},
        },
        "spec": {
            **(
                {}
                if resource_name(access.principal) == access.principal
                else {"userName": access.principal}
            ),
            "authentication": {"type": "scram-sha-512"},
            "authorization": {"type": "simple", "acls": [_acl(g) for g in access.grants]},
        },
    }


def kafka_users(
    kafka: KafkaSettings,
    *,
    streams: StreamsSettings,
    indexer: IndexerSettings,
    recommender: RecommenderSettings,
    quality: QualitySettings,
    cluster: str,
) -> list[dict[str, Any]]:
    """One KafkaUser per deployed component."""
    access = component_access(
        kafka, streams=streams, indexer=indexer, recommender=recommender, quality=quality
    )
    return [kafka_user(access[component], cluster=cluster) for component in DEPLOYED]
