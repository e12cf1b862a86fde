"""Shared fixtures: one embedded Kafka per test session, unique topic prefixes per test."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from schemas.settings import KafkaSettings


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Start one embedded single-node Kafka for the whole session; yield "127.0.0.1:PORT"."""
    from relata.runtime.kafka_broker import EmbeddedKafka

    with EmbeddedKafka() as kafka:
        yield kafka.bootstrap_servers


@pytest.fixture
def unique_id(request: pytest.FixtureRequest) -> str:
    """A short id unique to this test run, safe in topic names and group ids."""
    name = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-").lower()[:32]
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def kafka_settings(kafka_bootstrap: str, unique_id: str) -> KafkaSettings:
    """KafkaSettings for the session broker, with a topic prefix of its own for this test."""
    return KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=f"{unique_id}.",
        security_protocol="PLAINTEXT",
        partitions=2,
        replication_factor=1,
    )
