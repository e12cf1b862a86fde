"""Topics are declared, never guessed: against a real Apache Kafka, clients do not create the
topics they read, `ensure_topics` refuses a topic that differs from its declaration, and the
embedded broker with a data directory keeps topics and records across a restart."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from relata.runtime.kafka_broker import EmbeddedKafka
from relata.runtime.topics import TopicMismatchError, ensure_topics, topic_name
from schemas.settings import KafkaSettings
from schemas.topics import BEHAVIOR_EVENTS, ITEM_CATALOG, RECOMMENDATIONS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def permissive_broker() -> Iterator[str]:
    """A broker that WOULD create any topic a client names (the broker default): only the
    clients' own configuration keeps topics from being created."""
    with EmbeddedKafka(server_properties={"auto.create.topics.enable": "true"}) as kafka:
        yield kafka.bootstrap_servers


def _topics(bootstrap: str) -> set[str]:
    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30).topics)


def test_clients_reading_or_writing_a_missing_topic_do_not_create_it(
    permissive_broker: str,
) -> None:
    kafka = KafkaSettings(bootstrap_servers=permissive_broker)
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    read, written, faust_read = (f"{missing}-{what}" for what in ("read", "written", "aio"))

    consumer = Consumer(
        kafka.librdkafka_config("t") | {"group.id": f"g-{missing}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([read])
    for _ in range(8):  # several metadata refreshes of the subscription
        consumer.poll(0.5)
    consumer.list_topics(read, timeout=5)
    consumer.close()

    producer = Producer(kafka.librdkafka_producer_config("t") | {"message.timeout.ms": 3000})
    failures: list[object] = []
    producer.produce(written, value=b"x", on_delivery=lambda err, _m: failures.append(err))
    producer.flush(10)
    assert failures and failures[0] is not None, "a record to a missing topic must fail"

    async def read_with_aiokafka() -> None:
        from aiokafka import AIOKafkaConsumer

        from streams.faust_config import aiokafka_config, forbid_topic_auto_creation

        forbid_topic_auto_creation()
        reader = AIOKafkaConsumer(group_id=None, **aiokafka_config(kafka, "t"))
        await reader.start()
        try:
            # Subscribed after start: start() would wait for the topic's metadata until the
            # request timeout. Each getmany refreshes the subscription's metadata.
            reader.subscribe([faust_read])
            for _ in range(4):
                await reader.getmany(timeout_ms=500)
        finally:
            await reader.stop()

    asyncio.run(read_with_aiokafka())
    assert not {read, written, faust_read} & _topics(permissive_broker)


def test_ensure_topics_refuses_a_topic_with_the_wrong_partitions_and_policy(
    kafka_settings: KafkaSettings,
) -> None:
    admin = AdminClient(kafka_settings.librdkafka_config())
    catalog = topic_name(kafka_settings, ITEM_CATALOG)
    events = topic_name(kafka_settings, BEHAVIOR_EVENTS)
    # What a client-triggered auto-creation makes: one partition, cleanup.policy=delete.
    futures = admin.create_topics(
        [
            NewTopic(catalog, num_partitions=1, replication_factor=1),
            NewTopic(events, num_partitions=3, replication_factor=1),
        ]
    )
    for future in futures.values():
        future.result(30)

    with pytest.raises(TopicMismatchError) as info:
        ensure_topics(kafka_settings, [ITEM_CATALOG, BEHAVIOR_EVENTS, RECOMMENDATIONS])
    message = str(info.value)
    assert message.startswith("2 topic(s) differ from what relata declares")
    assert (
        f"topic {catalog} has 1 partition(s), needs at least 2 (RELATA_KAFKA_PARTITIONS) and "
        "has cleanup.policy=delete, needs cleanup.policy=compact"
    ) in message
    assert f"--entity-name {catalog} --add-config cleanup.policy=compact" in message
    assert f"topic {events} has 3 partition(s), needs exactly 2" in message
    # Nothing was created while declared topics are wrong.
    assert topic_name(kafka_settings, RECOMMENDATIONS) not in _topics(
        kafka_settings.bootstrap_servers
    )


def test_the_embedded_broker_keeps_topics_and_records_in_its_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "kafka"
    kafka = KafkaSettings(bootstrap_servers="unset", partitions=2)
    topic = topic_name(kafka, ITEM_CATALOG)
    with EmbeddedKafka(data_dir=data_dir) as broker:
        kafka = kafka.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
        assert ensure_topics(kafka, [ITEM_CATALOG]) == [topic]
        producer = Producer(kafka.librdkafka_producer_config("t"))
        for n in range(10):
            producer.produce(topic, key=f"item-{n}".encode(), value=b"{}")
        assert producer.flush(30) == 0
        first = broker.bootstrap_servers
    assert (data_dir / "data" / "meta.properties").is_file(), "stop must keep the data dir"
    cluster_id = (data_dir / "data" / "meta.properties").read_text()

    with EmbeddedKafka(data_dir=data_dir) as broker:
        assert broker.bootstrap_servers == first, "a restart keeps its port"
        assert ensure_topics(kafka, [ITEM_CATALOG]) == []  # kept, and still as declared
        consumer = Consumer(
            kafka.librdkafka_config("t")
            | {"group.id": f"g-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest"}
        )
        consumer.subscribe([topic])
        keys: set[bytes] = set()
        deadline = time.monotonic() + 60
        while len(keys) < 10 and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                keys.add(message.key() or b"")
        consumer.close()
    assert keys == {f"item-{n}".encode() for n in range(10)}
    assert (data_dir / "data" / "meta.properties").read_text() == cluster_id
