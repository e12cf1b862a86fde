"""The embedded broker and topic creation, against a real Apache Kafka."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from relata.runtime.kafka_broker import pid_alive, remove_stale_workdirs
from relata.runtime.topics import ensure_topics, topic_name
from schemas.settings import KafkaSettings
from schemas.topics import ALL_TOPICS, BEHAVIOR_EVENTS, ITEM_CATALOG, RECOMMENDATIONS

pytestmark = pytest.mark.integration


def _cleanup_policy(admin: AdminClient, topic: str) -> str:
    resource = ConfigResource(ResourceType.TOPIC, topic)
    configs = admin.describe_configs([resource])[resource].result(timeout=30)
    return str(configs["cleanup.policy"].value)


def test_produce_and_consume_round_trip(kafka_settings: KafkaSettings, unique_id: str) -> None:
    ensure_topics(kafka_settings, [BEHAVIOR_EVENTS])
    topic = topic_name(kafka_settings, BEHAVIOR_EVENTS)
    producer = Producer(kafka_settings.librdkafka_config())
    producer.produce(topic, key=b"user-1", value=b'{"hello": "kafka"}')
    assert producer.flush(30) == 0

    consumer = Consumer(
        {
            **kafka_settings.librdkafka_config(),
            "group.id": f"g-{unique_id}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    try:
        consumer.subscribe([topic])
        received = None
        for _ in range(60):
            msg = consumer.poll(1.0)
            if msg is not None and msg.error() is None:
                received = msg
                break
        assert received is not None, "no record consumed within 60 polls"
        assert received.key() == b"user-1"
        assert received.value() == b'{"hello": "kafka"}'
        assert received.topic() == topic
    finally:
        consumer.close()


def test_ensure_topics_sets_cleanup_policy_and_is_idempotent(kafka_settings: KafkaSettings) -> None:
    created = ensure_topics(kafka_settings, ALL_TOPICS, partitions=3)
    expected = {topic_name(kafka_settings, spec) for spec in ALL_TOPICS}
    assert set(created) == expected
    assert all(name.startswith(kafka_settings.topic_prefix) for name in expected)

    admin = AdminClient(kafka_settings.librdkafka_config())
    assert _cleanup_policy(admin, topic_name(kafka_settings, ITEM_CATALOG)) == "compact"
    assert _cleanup_policy(admin, topic_name(kafka_settings, RECOMMENDATIONS)) == "compact"
    assert _cleanup_policy(admin, topic_name(kafka_settings, BEHAVIOR_EVENTS)) == "delete"
    metadata = admin.list_topics(timeout=30)
    assert len(metadata.topics[topic_name(kafka_settings, ITEM_CATALOG)].partitions) == 3

    assert ensure_topics(kafka_settings, ALL_TOPICS, partitions=3) == []


_PARENT = """
import sys, time
from relata.runtime.kafka_broker import EmbeddedKafka
kafka = EmbeddedKafka()
kafka.start()
print(kafka.pid, kafka.workdir, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_broker_dies_with_its_parent(signum: signal.Signals) -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    java_pid = 0
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline().split()
        assert len(line) == 2, f"parent did not start a broker: {line}"
        java_pid, workdir = int(line[0]), Path(line[1])
        assert pid_alive(java_pid)
        parent.send_signal(signum)
        parent.wait(timeout=60)
        for _ in range(300):
            if not pid_alive(java_pid):
                break
            time.sleep(0.1)
        assert not pid_alive(java_pid), "java broker outlived its parent"
        if signum == signal.SIGTERM:
            assert not workdir.exists(), "clean stop must remove the temp dir"
        else:
            remove_stale_workdirs()  # what the next EmbeddedKafka.start() does
            assert not workdir.exists()
    finally:
        if parent.poll() is None:
            parent.kill()
        if java_pid and pid_alive(java_pid):
            os.kill(java_pid, signal.SIGKILL)


@pytest.mark.slow
def test_start_retries_when_its_port_was_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import relata.runtime.kafka_broker as kb

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = kb.free_port
        monkeypatch.setattr(
            kb, "free_port", lambda host="127.0.0.1": next(ports, None) or real_free_port(host)
        )
        with kb.EmbeddedKafka() as kafka:
            assert kafka.port != taken
            metadata = AdminClient({"bootstrap.servers": kafka.bootstrap_servers}).list_topics(
                timeout=30
            )
            assert metadata.brokers
