"""relata against a secured Kafka: one embedded broker for the module with SASL_SSL (SCRAM-SHA-512
users created with the storage, TLS from a CA made here), ACLs per component and an mTLS
listener that requires client certificates."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from relata.runtime.kafka_broker import EmbeddedKafka
from relata.runtime.kafka_security import ADMIN, KafkaSecurity, create_user, grant_acls
from relata.runtime.pipeline import Pipeline, PipelineOptions
from relata.runtime.preflight import KafkaUnavailableError, check_kafka
from relata.runtime.topics import ensure_topics
from schemas.access import component_access
from schemas.settings import IndexerSettings, KafkaSettings, RecommenderSettings
from schemas.topics import ALL_TOPICS, RECOMMENDATIONS

pytestmark = pytest.mark.integration

RELATA = str(Path(sys.executable).with_name("relata"))
RETAIL = Path(__file__).resolve().parents[2] / "data" / "online-retail"
PREFIX = f"sec-{uuid.uuid4().hex[:6]}."
EVENTS = 120


def _names() -> KafkaSettings:
    return KafkaSettings(topic_prefix=PREFIX)


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedKafka]:
    accesses = component_access(
        _names(),
        indexer=IndexerSettings(group_id=f"{PREFIX}indexer"),
        recommender=RecommenderSettings(group_id=f"{PREFIX}recommender"),
    )
    with EmbeddedKafka(security=KafkaSecurity(tuple(accesses.values()))) as kafka:
        ensure_topics(settings_of(kafka.client_env(ADMIN)), ALL_TOPICS, partitions=1)
        yield kafka


def settings_of(env: dict[str, str], **extra: object) -> KafkaSettings:
    """KafkaSettings from `RELATA_KAFKA_*` values (as a process would read them)."""
    values: dict[str, object] = {"topic_prefix": PREFIX, "connect_timeout_s": 10}
    values |= {name.removeprefix("RELATA_KAFKA_").lower(): value for name, value in env.items()}
    return KafkaSettings(**(values | extra))  # type: ignore[arg-type]  # validated by pydantic


def _small_data_set(directory: Path) -> Path:
    """The first EVENTS online-retail events and exactly the items they name."""
    directory.mkdir()
    with gzip.open(RETAIL / "events.jsonl.gz", "rt") as fh:
        events = [next(fh) for _ in range(EVENTS)]
    wanted = {json.loads(line)["item_id"] for line in events}
    with gzip.open(RETAIL / "items.jsonl.gz", "rt") as fh:
        items = [line for line in fh if json.loads(line)["item_id"] in wanted]
    with gzip.open(directory / "events.jsonl.gz", "wt") as fh:
        fh.writelines(events)
    with gzip.open(directory / "items.jsonl.gz", "wt") as fh:
        fh.writelines(items)
    return directory


def test_pipeline_runs_with_a_principal_and_acls_per_component(
    broker: EmbeddedKafka, tmp_path: Path
) -> None:
    """Events in, profile updates, recommendations out: the stream processor, the workers and
    the driver each authenticate as their own user and are granted only their ACLs."""
    options = PipelineOptions(
        data_dir=_small_data_set(tmp_path / "data"),
        kafka=settings_of(broker.client_env(ADMIN), topic_prefix=""),
        ready_timeout_s=240,
        process_env={
            "workers": broker.client_env("relata-workers"),
            "streams": broker.client_env("relata-streams"),
            "associations": broker.client_env("relata-streams"),
        },
    )
    pipeline = Pipeline(options)
    grant_acls(broker.admin_config(), tuple(pipeline.component_access().values()))
    with pipeline:
        assert pipeline.probe is not None
        sent = pipeline.replay(rate=0, limit=None).sent
        assert sent == EVENTS
        assert pipeline.wait_drained(quiet_s=2.0, timeout_s=120)
        probe = pipeline.probe
        assert len(probe.profile_stage) > 0  # profile updates reached the driver
        assert probe.stats.recommendations > 0
        user, rec = next(iter(probe.latest.items()))
        assert rec["items"], f"no items recommended to {user}"
        assert not probe.stats.dead_letters


def test_a_wrong_password_is_one_line_and_a_quick_exit(broker: EmbeddedKafka) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELATA_")}
    env |= broker.client_env("relata-workers") | {
        "RELATA_KAFKA_SASL_PASSWORD": "not-the-password",
        "RELATA_KAFKA_TOPIC_PREFIX": PREFIX,
        "RELATA_KAFKA_CONNECT_TIMEOUT_S": "20",
    }
    started = time.monotonic()
    proc = subprocess.run(
        [RELATA, "workers"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 15, f"took {elapsed:.1f} s"  # not the 20 s connect timeout: no retrying
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, "\n".join(lines[:20])
    assert lines[0].startswith(f"Error: Kafka at {broker.bootstrap_servers}: authentication failed")
    assert "RELATA_KAFKA_SASL_*" in lines[0]


def test_a_component_without_the_acls_of_a_topic_is_told_which(broker: EmbeddedKafka) -> None:
    recommender = component_access(
        _names(), recommender=RecommenderSettings(group_id=f"{PREFIX}recommender")
    )["recommender"]
    topic = _names().topic(RECOMMENDATIONS.name)
    # The recommender's ACLs less those of the topic it writes, for a user of its own.
    partial = replace(
        recommender,
        principal=f"relata-partial-{uuid.uuid4().hex[:6]}",
        grants=tuple(g for g in recommender.grants if g.name != topic),
    )
    create_user(broker.admin_config(), partial.principal, "partial-password")
    grant_acls(broker.admin_config(), (partial,))
    env = broker.client_env("relata-recommender") | {
        "RELATA_KAFKA_SASL_USERNAME": partial.principal,
        "RELATA_KAFKA_SASL_PASSWORD": "partial-password",
    }
    kafka = settings_of(env)
    with pytest.raises(KafkaUnavailableError) as failure:
        check_kafka(kafka, needs=recommender.topics())
    message = str(failure.value)
    assert message.startswith(f"Kafka at {broker.bootstrap_servers}: not authorized (")
    assert f"user {partial.principal} is not granted DESCRIBE on topic {topic}" in message
    assert f"WRITE on topic {topic}" in message
    assert "check the ACLs" in message and "\n" not in message
    # With every ACL of the recommender, the same check passes.
    assert (
        check_kafka(
            settings_of(broker.client_env("relata-recommender")), needs=recommender.topics()
        )
        == 1
    )


def test_mtls_accepts_a_certificate_of_the_ca_and_refuses_none(
    broker: EmbeddedKafka, tmp_path: Path
) -> None:
    assert broker.material is not None
    # CN=relata-indexer: on the mTLS listener this client is User:relata-indexer.
    cert, key = broker.material.ca.issue("relata-indexer", tmp_path, key_password="key-pw")
    base = broker.client_env("relata-indexer", mtls=True)
    kafka = settings_of(base, ssl_certfile=cert, ssl_keyfile=key, ssl_key_password="key-pw")
    indexer = component_access(_names(), indexer=IndexerSettings(group_id=f"{PREFIX}indexer"))
    assert check_kafka(kafka, needs=indexer["indexer"].topics()) == 1  # librdkafka
    assert asyncio.run(_aiokafka_topics(kafka)) >= {_names().topic("item-catalog")}  # aiokafka

    no_cert = {k: v for k, v in base.items() if "CERTFILE" not in k and "KEYFILE" not in k}
    with pytest.raises(KafkaUnavailableError) as failure:
        check_kafka(settings_of(no_cert, connect_timeout_s=5))
    message = str(failure.value)
    assert message.startswith(f"Kafka at {broker.mtls_bootstrap_servers}: TLS handshake failed (")
    assert "RELATA_KAFKA_SSL_*" in message


async def _aiokafka_topics(kafka: KafkaSettings) -> set[str]:
    """The topics an aiokafka consumer with the stream processor's client config sees."""
    from aiokafka import AIOKafkaConsumer

    from streams.faust_config import aiokafka_config

    consumer = AIOKafkaConsumer(**aiokafka_config(kafka, "relata-test-mtls"))
    await consumer.start()
    try:
        return set(await consumer.topics())
    finally:
        await consumer.stop()
