"""Topic administration: relata's topics are declared by `schemas.topics` specs, created here
with their partitions and cleanup policy, and checked against them at every start.

Clients never create topics (`allow.auto.create.topics=false`; the embedded broker has
`auto.create.topics.enable=false`), so a missing topic is created here or not at all, and an
existing topic that does not match its declaration stops the process with the fix.

Partitions: a topic must have at least the configured count. Topics a table is
co-partitioned with (`behavior-events` and the profiles changelog, `recommendations` and its
Faust table, the one-partition association input) must have exactly it: their partition
numbers are the table's. So must `recommendations-shadow`: live quality joins partition n of
`behavior-events` with partition n of both list topics. The others may have more (extra
partitions only add consumers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from schemas.settings import KafkaSettings
from schemas.topics import BEHAVIOR_EVENTS, RECOMMENDATIONS, RECOMMENDATIONS_SHADOW, TopicSpec

logger = logging.getLogger(__name__)

# Partitions of these topics are the partitions of a table: their counts must match exactly.
COPARTITIONED = frozenset({BEHAVIOR_EVENTS.name, RECOMMENDATIONS.name, RECOMMENDATIONS_SHADOW.name})


class TopicError(RuntimeError):
    """Topics could not be created or did not become available."""


class TopicMismatchError(TopicError):
    """Existing topics differ from their declaration (partitions or cleanup policy)."""


@dataclass(frozen=True, slots=True)
class WantedTopic:
    """What a topic must look like: its partitions (exactly, or at least), its cleanup policy."""

    partitions: int
    cleanup_policy: str
    exact_partitions: bool = True


def topic_name(settings: KafkaSettings, spec: TopicSpec) -> str:
    """The deployed name of a topic: `settings.topic_prefix` + the spec's name."""
    return spec.full_name(settings.topic_prefix)


def ensure_topics(
    settings: KafkaSettings,
    specs: Iterable[TopicSpec],
    *,
    partitions: int | None = None,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the missing topics of `specs` (prefixed) with each spec's cleanup policy, and
    check the existing ones against their specs (`TopicMismatchError` names each difference
    and its fix).

    Idempotent: a concurrent creator is fine. Returns the names it created; waits until every
    topic has leaders for its partitions.
    """
    count = partitions or settings.partitions
    wanted = {
        topic_name(settings, spec): WantedTopic(
            count, spec.cleanup_policy, exact_partitions=spec.name in COPARTITIONED
        )
        for spec in specs
    }
    return create_missing_topics(settings, wanted, timeout_s=timeout_s)


def create_missing_topics(
    settings: KafkaSettings, wanted: Mapping[str, WantedTopic], *, timeout_s: float = 30.0
) -> list[str]:
    """Create the topics of `wanted` (full name -> declaration) that are missing and check the
    others, as `ensure_topics` does; also for internal topics that have no spec."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]  # re-exported at runtime

    if not wanted:
        return []
    config: dict[str, str | int | float | bool] = {**settings.librdkafka_config("relata-admin")}
    admin = AdminClient(config)
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        msg = f"cannot list topics at {settings.bootstrap_servers}: {exc}"
        raise TopicError(msg) from exc
    existing = {
        name: len(info.partitions)
        for name, info in metadata.topics.items()
        if name in wanted and info.error is None
    }
    check_topics(wanted, existing, _cleanup_policies(admin, list(existing), timeout_s=timeout_s))
    new = [
        NewTopic(
            name,
            num_partitions=spec.partitions,
            replication_factor=settings.replication_factor,
            config={"cleanup.policy": spec.cleanup_policy},
        )
        for name, spec in wanted.items()
        if name not in existing
    ]
    created: list[str] = []
    if new:
        futures = admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
        for name, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                msg = f"cannot create topic {name} at {settings.bootstrap_servers}: {exc}"
                raise TopicError(msg) from exc
            created.append(name)
            logger.info(
                "created topic=%s partitions=%d cleanup.policy=%s",
                name,
                wanted[name].partitions,
                wanted[name].cleanup_policy,
            )
    _wait_for_leaders(admin, list(wanted), timeout_s=timeout_s)
    return created


def _cleanup_policies(admin: Any, names: list[str], *, timeout_s: float) -> dict[str, str]:
    """`cleanup.policy` of each topic of `names` (DescribeConfigs)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported at runtime
        ConfigResource,
        ResourceType,
    )

    if not names:
        return {}
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
    futures = admin.describe_configs(resources, request_timeout=timeout_s)
    policies: dict[str, str] = {}
    for resource, future in futures.items():
        try:
            entries = future.result(timeout=timeout_s)
        except KafkaException as exc:
            msg = f"cannot describe topic {resource.name}: {exc}"
            raise TopicError(msg) from exc
        policies[resource.name] = str(entries["cleanup.policy"].value)
    return policies


def check_topics(
    wanted: Mapping[str, WantedTopic],
    partitions: Mapping[str, int],
    policies: Mapping[str, str],
) -> None:
    """Raise `TopicMismatchError` listing every existing topic (name -> partitions, cleanup
    policy) that differs from its declaration in `wanted`; missing topics are not checked."""
    problems = [
        problem
        for name in sorted(partitions)
        if name in wanted
        and (problem := topic_mismatch(name, wanted[name], partitions[name], policies.get(name)))
    ]
    if problems:
        head = (
            f"{len(problems)} topic(s) differ from what relata declares; relata does not change "
            "existing topics:"
        )
        raise TopicMismatchError("\n".join([head, *(f"- {p}" for p in problems)]))


def topic_mismatch(
    name: str, wanted: WantedTopic, partitions: int, cleanup_policy: str | None
) -> str | None:
    """How topic `name` differs from `wanted`, what it should be and how to fix it; None when
    it matches."""
    problems: list[str] = []
    fixes: list[str] = []
    too_few = partitions < wanted.partitions
    too_many = wanted.exact_partitions and partitions > wanted.partitions
    if too_few or too_many:
        need = "exactly" if wanted.exact_partitions else "at least"
        problems.append(
            f"has {partitions} partition(s), needs {need} {wanted.partitions} "
            "(RELATA_KAFKA_PARTITIONS)"
        )
        if too_few and not wanted.exact_partitions:
            fixes.append(
                f"kafka-topics.sh --alter --topic {name} --partitions {wanted.partitions} "
                "(keyed records of later writes move partitions)"
            )
        else:
            fixes.append(
                f"delete {name} and start again to recreate it (its records are lost), or set "
                f"RELATA_KAFKA_PARTITIONS={partitions} if every co-partitioned topic has "
                f"{partitions}"
            )
    if cleanup_policy is not None and _policy_set(cleanup_policy) != _policy_set(
        wanted.cleanup_policy
    ):
        problems.append(
            f"has cleanup.policy={cleanup_policy}, needs cleanup.policy={wanted.cleanup_policy}"
        )
        fixes.append(
            f"kafka-configs.sh --alter --entity-type topics --entity-name {name} "
            f"--add-config cleanup.policy={wanted.cleanup_policy}"
        )
    if not problems:
        return None
    return f"topic {name} " + " and ".join(problems) + "; fix: " + "; ".join(fixes)


def _policy_set(policy: str) -> frozenset[str]:
    return frozenset(part.strip() for part in policy.split(",") if part.strip())


def _wait_for_leaders(admin: Any, names: list[str], *, timeout_s: float) -> None:
    """Wait until metadata shows every partition of `names` with a leader."""
    deadline = time.monotonic() + timeout_s
    while True:
        metadata = admin.list_topics(timeout=timeout_s)
        missing = [
            name
            for name in names
            if name not in metadata.topics
            or metadata.topics[name].error is not None
            or not metadata.topics[name].partitions
            or any(p.leader < 0 for p in metadata.topics[name].partitions.values())
        ]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TopicError(
                f"topics without leaders after {timeout_s:.0f} s: {', '.join(missing)}"
            )
        time.sleep(0.1)
