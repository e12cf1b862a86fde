"""Kafka client configuration and topic creation from `schemas.topics` specs."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from schemas.settings import KafkaSettings
from schemas.topics import TopicSpec

logger = logging.getLogger(__name__)


class TopicError(RuntimeError):
    """Topics could not be created or did not become available."""


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
    """Create the missing topics of `specs` (prefixed) with each spec's cleanup policy.

    Idempotent: existing topics are left as they are (a concurrent creator is fine).
    Returns the names it created; waits until every topic has leaders for its partitions.
    """
    count = partitions or settings.partitions
    wanted = {topic_name(settings, spec): (count, spec.cleanup_policy) for spec in specs}
    return create_missing_topics(settings, wanted, timeout_s=timeout_s)


def create_missing_topics(
    settings: KafkaSettings, wanted: Mapping[str, tuple[int, str]], *, timeout_s: float = 30.0
) -> list[str]:
    """Create the topics of `wanted` (full name -> partitions, cleanup policy) that are
    missing, as `ensure_topics` does; also for internal topics that have no spec."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]  # re-exported at runtime

    if not wanted:
        return []
    config: dict[str, str | int | float | bool] = {**settings.librdkafka_config("relata-admin")}
    admin = AdminClient(config)
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        msg = f"cannot list topics at {settings.bootstrap_servers}: {exc}"
        raise TopicError(msg) from exc
    new = [
        NewTopic(
            name,
            num_partitions=count,
            replication_factor=settings.replication_factor,
            config={"cleanup.policy": policy},
        )
        for name, (count, policy) in wanted.items()
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
            count, policy = wanted[name]
            logger.info("created topic=%s partitions=%d cleanup.policy=%s", name, count, policy)
    _wait_for_leaders(admin, list(wanted), timeout_s=timeout_s)
    return created


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
