"""Erasing a user against the real broker, the real stream processor and workers: after
`relata erase`'s request and a compaction, no record keyed by the user is left in any
compacted topic relata keeps (profiles changelog, recommendations, the recommendations
table's changelog), the HTTP API answers as for a user never seen (the trending list, or 404
while none is published), never with the user's old list, the audit holds the request without
the user, and a new event starts a fresh profile. Other users are untouched."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from relata.cli.run_streams import start_streams_in_thread
from relata.runtime.kafka_broker import free_port
from relata.runtime.replay import erasure_request, send_erasure
from relata.runtime.topics import ensure_topics
from schemas.messages import ErasureAudit
from schemas.settings import KafkaSettings, StreamsSettings
from schemas.topics import ALL_TOPICS, ERASURE_AUDIT, RECOMMENDATIONS
from streams.naming import profiles_changelog_topic
from tests.integration.test_poison_pipeline import ITEMS, event, publish, workers_running
from workers.edge_store import EdgeVectorStore

pytestmark = pytest.mark.integration

WAIT_S = 120.0
_ = workers_running  # the fixture, used by name


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _wait(what: str, condition: Any, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.2)


def _records(kafka: KafkaSettings, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    """Every record (key, value) readable in `topic` now, all partitions, from the start."""
    consumer = Consumer(
        kafka.librdkafka_config() | {"group.id": "erasure-reader", "enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        out: list[tuple[bytes | None, bytes | None]] = []
        for p in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)])
            position = low
            deadline = time.monotonic() + 30
            while position < high and time.monotonic() < deadline:
                for message in consumer.consume(500, timeout=0.5):
                    if message.error() is None:
                        out.append((message.key(), message.value()))
                        position = message.offset() + 1
                if not out or position < high:
                    (current,) = consumer.position([TopicPartition(topic, p)])
                    position = max(position, current.offset)
            consumer.unassign()
        return out
    finally:
        consumer.close()


def _compact_now(kafka: KafkaSettings, topics: list[str]) -> None:
    """Let the cleaner compact `topics` at once and drop tombstones soon after."""
    admin = AdminClient(kafka.librdkafka_config())
    config = {"segment.ms": "100", "min.cleanable.dirty.ratio": "0.01", "delete.retention.ms": "0"}
    # Incremental: a plain alter_configs would replace the topic's whole config (its
    # cleanup.policy=compact included).
    resources = [
        ConfigResource(
            "topic",
            topic,
            incremental_configs=[
                ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
                for name, value in config.items()
            ],
        )
        for topic in topics
    ]
    for future in admin.incremental_alter_configs(resources).values():
        future.result(30)


def test_an_erased_user_is_gone_from_every_compacted_topic_and_starts_anew(
    kafka_settings: KafkaSettings,
    unique_id: str,
    tmp_path: Path,
    workers_running: tuple[threading.Thread, threading.Event, EdgeVectorStore],
) -> None:
    kafka = kafka_settings
    ensure_topics(kafka, ALL_TOPICS)
    catalog = [
        (item_id.encode(), json.dumps({"item_id": item_id, "title": title}).encode())
        for item_id, title in ITEMS.items()
    ]
    publish(kafka, "item-catalog", catalog)
    settings = StreamsSettings(
        app_id=f"streams-{unique_id}",
        data_dir=tmp_path / "faust",
        web_port=free_port(),
        session_timeout_s=3.0,
        heartbeat_interval_s=0.5,
    )
    url = f"http://127.0.0.1:{settings.web_port}/users/{{}}/recommendations"
    with start_streams_in_thread(kafka=kafka, settings=settings, ready_timeout_s=120):
        publish(
            kafka,
            "behavior-events",
            [
                (u.encode(), event(n, u, item))
                for n, item in ((1, "i1"), (2, "i2"))
                for u in ("u1", "u2")
            ],
        )
        _wait(
            "both users answered", lambda: all(_get(url.format(u))[0] == 200 for u in ("u1", "u2"))
        )

        request = erasure_request("u1", "req-erasure-test")
        send_erasure(kafka, request)

        def as_never_seen() -> bool:
            status, body = _get(url.format("u1"))
            return status == 404 or (status == 200 and body.get("trending") is True)

        _wait("u1's recommendations gone", as_never_seen)
        audit_topic = kafka.topic(ERASURE_AUDIT.name)
        _wait("the erasure audited", lambda: bool(_records(kafka, audit_topic)))
        ((_, audit_raw),) = _records(kafka, audit_topic)
        assert audit_raw is not None and b"u1" not in audit_raw
        audit = ErasureAudit.model_validate_json(audit_raw)
        assert (audit.request_id, audit.profile_found) == ("req-erasure-test", True)
        assert _get(url.format("u2"))[0] == 200  # nobody else is touched

        compacted = [
            profiles_changelog_topic(kafka, settings),
            kafka.topic(RECOMMENDATIONS.name),
            f"{kafka.topic(settings.app_id)}-recommendations-changelog",
        ]
        user_keys = {b"u1", json.dumps("u1").encode()}
        _compact_now(kafka, compacted)
        producer = Producer(kafka.librdkafka_producer_config())

        def erased_everywhere() -> bool:
            # Each append rolls the active segment (segment.ms has passed), so the cleaner can
            # compact what holds the user, and then drop their tombstones.
            for topic in compacted:
                producer.produce(topic, key=b'"compaction-roll"', value=None)
            producer.flush(10)
            return not any(
                key in user_keys for topic in compacted for key, _ in _records(kafka, topic)
            )

        _wait("no record keyed by u1 in the compacted topics", erased_everywhere, 90)
        assert any(key == b"u2" for key, _ in _records(kafka, kafka.topic(RECOMMENDATIONS.name)))

        # New events of the erased user start a fresh profile.
        publish(kafka, "behavior-events", [(b"u1", event(3, "u1", "i3"))])

        def answered_anew() -> bool:
            status, body = _get(url.format("u1"))
            return status == 200 and body.get("trigger_event_ids") == ["u1-e3"]

        _wait("u1 answered from the new event only", answered_anew)
        profiles = [
            json.loads(value)
            for key, value in _records(kafka, profiles_changelog_topic(kafka, settings))
            if key == json.dumps("u1").encode() and value is not None
        ]
        assert [h["item_id"] for h in profiles[-1]["history"]] == ["i3"]
