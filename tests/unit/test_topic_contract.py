"""Topics are declared, never guessed: no client asks for auto-creation, and an existing topic
that differs from its declaration is refused with the fix."""

from __future__ import annotations

import pytest

from relata.runtime.topics import (
    TopicMismatchError,
    WantedTopic,
    check_topics,
    ensure_topics,
    topic_mismatch,
)
from schemas.settings import KafkaSettings, StreamsSettings


def test_every_librdkafka_client_config_forbids_auto_creation() -> None:
    kafka = KafkaSettings(bootstrap_servers="h:1")
    for config in (
        kafka.librdkafka_config(),
        kafka.librdkafka_config("relata-tail"),
        kafka.librdkafka_producer_config("relata-replay"),
    ):
        # librdkafka's producers default to true: the consumers' default is not enough.
        assert config["allow.auto.create.topics"] == "false"


def test_the_consumers_relata_builds_inherit_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from relata.cli.run_workers import build_consumer
    from relata.runtime.tail import make_consumer

    seen: list[dict[str, object]] = []

    class Recorder:
        def __init__(self, config: dict[str, object]) -> None:
            seen.append(config)

    import confluent_kafka

    kafka = KafkaSettings(bootstrap_servers="h:1")
    monkeypatch.setattr(confluent_kafka, "Consumer", Recorder)
    build_consumer(kafka, group_id="g", client_id="c")
    make_consumer(kafka)
    assert [config["allow.auto.create.topics"] for config in seen] == ["false", "false"]


def test_aiokafka_metadata_requests_do_not_ask_for_auto_creation() -> None:
    import aiokafka.client
    from aiokafka.protocol.metadata import MetadataRequest_v0, MetadataRequest_v5

    from streams.faust_config import forbid_topic_auto_creation

    forbid_topic_auto_creation()
    request = aiokafka.client.MetadataRequest(["item-catalog"])
    assert request.build(MetadataRequest_v5).allow_auto_topic_creation is False
    assert request.build(MetadataRequest_v0).topics == ["item-catalog"]
    # "all topics" (None) and the bootstrap request ([]) keep their meaning.
    assert aiokafka.client.MetadataRequest(None).build(MetadataRequest_v5).topics is None


def test_building_the_stream_processor_forbids_aiokafka_auto_creation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aiokafka.client
    from aiokafka.protocol.metadata import MetadataRequest, MetadataRequest_v5

    from streams.app import build_streams

    monkeypatch.setattr(aiokafka.client, "MetadataRequest", MetadataRequest)

    class NoSender:
        def send(self, *args: object, **kwargs: object) -> None: ...

    from prometheus_client import CollectorRegistry

    build_streams(
        kafka=KafkaSettings(bootstrap_servers="h:1"),
        settings=StreamsSettings(web_port=0),
        registry=CollectorRegistry(),
        sender=NoSender(),  # type: ignore[arg-type]  # never used: nothing starts
        follow_topics=False,
    )
    request = aiokafka.client.MetadataRequest(["recommendations"])
    assert request.build(MetadataRequest_v5).allow_auto_topic_creation is False


def test_a_matching_topic_passes() -> None:
    assert topic_mismatch("t", WantedTopic(4, "compact"), 4, "compact") is None
    check_topics({"t": WantedTopic(4, "compact")}, {"t": 4}, {"t": "compact"})


def test_an_auto_created_topic_is_refused_with_what_it_has_needs_and_the_fix() -> None:
    message = topic_mismatch("item-catalog", WantedTopic(4, "compact", False), 1, "delete")
    assert message is not None
    assert message.startswith("topic item-catalog has 1 partition(s), needs at least 4")
    assert "has cleanup.policy=delete, needs cleanup.policy=compact" in message
    assert "kafka-topics.sh --alter --topic item-catalog --partitions 4" in message
    assert (
        "kafka-configs.sh --alter --entity-type topics --entity-name item-catalog "
        "--add-config cleanup.policy=compact"
    ) in message


def test_more_partitions_pass_unless_a_table_is_partitioned_like_the_topic() -> None:
    assert topic_mismatch("dead-letter", WantedTopic(4, "delete", False), 8, "delete") is None
    message = topic_mismatch("behavior-events", WantedTopic(4, "delete"), 8, "delete")
    assert message is not None
    assert "has 8 partition(s), needs exactly 4 (RELATA_KAFKA_PARTITIONS)" in message
    assert "delete behavior-events and start again" in message
    assert "RELATA_KAFKA_PARTITIONS=8" in message


def test_the_policy_is_compared_as_a_set() -> None:
    wanted = WantedTopic(1, "compact,delete")
    assert topic_mismatch("t", wanted, 1, "delete, compact") is None
    assert topic_mismatch("t", WantedTopic(1, "compact"), 1, "compact,delete") is not None


def test_every_mismatch_is_listed_in_one_error() -> None:
    wanted = {
        "a": WantedTopic(2, "compact"),
        "b": WantedTopic(2, "delete"),
        "c": WantedTopic(2, "delete"),
    }
    with pytest.raises(TopicMismatchError) as info:
        check_topics(
            wanted, {"a": 1, "b": 2, "c": 2}, {"a": "compact", "b": "compact", "c": "delete"}
        )
    lines = str(info.value).splitlines()
    assert lines[0].startswith("2 topic(s) differ from what relata declares")
    assert lines[1].startswith("- topic a has 1 partition(s)")
    assert lines[2].startswith("- topic b has cleanup.policy=compact")


def test_ensure_topics_checks_existing_topics_and_creates_only_missing_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    import confluent_kafka.admin

    from schemas.topics import BEHAVIOR_EVENTS, ITEM_CATALOG

    class FakeAdmin:
        def __init__(self, config: dict[str, object]) -> None:
            self.created: list[str] = []

        def list_topics(self, timeout: float) -> object:
            partitions = {0: SimpleNamespace(leader=1)}
            topic = SimpleNamespace(error=None, partitions=partitions)
            return SimpleNamespace(topics={"p.item-catalog": topic})

        def describe_configs(self, resources: list[object], request_timeout: float) -> object:
            future = SimpleNamespace(
                result=lambda timeout: {"cleanup.policy": SimpleNamespace(value="delete")}
            )
            return dict.fromkeys(resources, future)

        def create_topics(self, *args: object, **kwargs: object) -> object:
            raise AssertionError("nothing may be created when a declared topic is wrong")

    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", FakeAdmin)
    kafka = KafkaSettings(bootstrap_servers="h:1", topic_prefix="p.", partitions=2)
    with pytest.raises(TopicMismatchError, match=r"topic p\.item-catalog has 1 partition"):
        ensure_topics(kafka, [ITEM_CATALOG, BEHAVIOR_EVENTS])


def test_every_librdkafka_client_goes_back_to_the_bootstrap_servers_within_seconds() -> None:
    # A broker that returns fenced answers metadata without itself; the client then knows no
    # broker and, by librdkafka's default, would wait 5 minutes before re-bootstrapping.
    from confluent_kafka import Consumer, Producer

    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    consumer_config = kafka.librdkafka_config("relata-test") | {"group.id": "g"}
    producer_config = kafka.librdkafka_producer_config("relata-test")
    for config in (consumer_config, producer_config):
        assert int(config["metadata.recovery.rebootstrap.trigger.ms"]) <= 10_000
    # The installed librdkafka knows the property (an unknown one raises here).
    Consumer(consumer_config).close()
    Producer(producer_config).flush(0)


def test_client_debug_reaches_every_librdkafka_client_and_is_validated() -> None:
    assert "debug" not in KafkaSettings().librdkafka_config()
    debug = KafkaSettings(client_debug="cgrp,consumer").librdkafka_config("relata-test")
    assert debug["debug"] == "cgrp,consumer"
    with pytest.raises(ValueError, match="client_debug"):
        KafkaSettings(client_debug="cgrp; rm -rf")
