"""Poison records against the real broker: a record nested 5000 levels deep and one of about
990 KB, in `behavior-events` and in the compacted `item-catalog`, while good events flow.
Every process stays up, good events still become profile updates and recommendations, and
each poison record has its bounded dead letter."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from prometheus_client import CollectorRegistry

from relata.cli.run_streams import start_streams_in_thread
from relata.cli.run_workers import build_workers
from relata.runtime.kafka_broker import free_port
from relata.runtime.topics import ensure_topics
from schemas.messages import DEAD_LETTER_MAX_BYTES, DeadLetter, ProfileUpdate, Recommendation
from schemas.settings import (
    EncoderSettings,
    IndexerSettings,
    KafkaSettings,
    RecommenderSettings,
    StoreSettings,
    StreamsSettings,
)
from schemas.topics import ALL_TOPICS
from workers.edge_store import EdgeVectorStore
from workers.encoder import TransformerEncoder

pytestmark = pytest.mark.integration

WAIT_S = 180.0
NOW = datetime.now(UTC).replace(microsecond=0)
ITEMS = {
    "i1": "red matte lipstick",
    "i2": "pink matte lipstick",
    "i3": "dry shampoo for volume",
    "i4": "coral matte lipstick",
}
USERS = ["u1", "u2", "u3"]
DEEP = 5000


def deep_array() -> bytes:
    return b"[" * DEEP + b"]" * DEEP


def huge(data: dict[str, Any], field: str) -> bytes:
    raw = json.dumps({**data, field: "x" * 990_000}).encode()
    assert 950_000 < len(raw) < 999_000  # under the producer's and the broker's limits
    return raw


def event(n: int, user: str, item: str) -> bytes:
    data = {
        "event_id": f"{user}-e{n}",
        "user_id": user,
        "item_id": item,
        "event_type": "purchase",
        "ts": (NOW + timedelta(seconds=n)).isoformat(),
        "session_id": f"{user}-basket",
    }
    return json.dumps(data).encode()


def publish(kafka: KafkaSettings, topic: str, records: list[tuple[bytes, bytes | None]]) -> None:
    producer = Producer(kafka.librdkafka_producer_config())
    for key, value in records:
        producer.produce(kafka.topic(topic), key=key, value=value)
    assert producer.flush(30) == 0


@pytest.fixture
def workers_running(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> Iterator[tuple[threading.Thread, threading.Event, EdgeVectorStore]]:
    encoder = TransformerEncoder.from_settings(EncoderSettings(device="cpu"))
    store = EdgeVectorStore(tmp_path / "edge")
    store.ensure_collection(encoder.dim)
    workers = build_workers(
        "all",
        kafka=kafka_settings,
        encoder_settings=EncoderSettings(),
        store_settings=StoreSettings(kind="edge", path=tmp_path),
        indexer_settings=IndexerSettings(group_id=f"{kafka_settings.topic_prefix}indexer"),
        recommender_settings=RecommenderSettings(
            group_id=f"{kafka_settings.topic_prefix}recommender", k=3, candidates=10
        ),
        registry=CollectorRegistry(),
        encoder=encoder,
        store=store,
    )
    stop = threading.Event()
    thread = threading.Thread(target=workers.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield thread, stop, store
    finally:
        stop.set()
        thread.join(30)
        workers.close()


def test_poison_records_in_both_input_topics_never_stop_a_process(
    kafka_settings: KafkaSettings,
    unique_id: str,
    tmp_path: Path,
    workers_running: tuple[threading.Thread, threading.Event, EdgeVectorStore],
) -> None:
    kafka = kafka_settings
    workers_thread, workers_stopped, store = workers_running
    ensure_topics(kafka, ALL_TOPICS)

    poison_catalog = {b"deep-item": deep_array(), b"huge-item": huge({"item_id": "h"}, "title")}
    catalog = [
        (item_id.encode(), json.dumps({"item_id": item_id, "title": title}).encode())
        for item_id, title in ITEMS.items()
    ]
    # The poison comes first in the compacted topic: everything after it must still be read.
    publish(kafka, "item-catalog", [*poison_catalog.items(), *catalog])

    settings = StreamsSettings(
        app_id=f"streams-{unique_id}",
        data_dir=tmp_path / "faust",
        web_port=free_port(),
        session_timeout_s=3.0,
        heartbeat_interval_s=0.5,
    )
    poison_events = {b"deep-event": deep_array(), b"huge-event": huge({"user_id": "u1"}, "item_id")}
    with start_streams_in_thread(kafka=kafka, settings=settings, ready_timeout_s=120) as streams:
        good = [(u.encode(), event(1, u, "i1")) for u in USERS]
        later = [(u.encode(), event(2, u, "i2")) for u in USERS]
        # Poison between good events, keyed like them (one user's partition).
        poison = [(b"u1", value) for value in poison_events.values()]
        publish(kafka, "behavior-events", [*good, *poison, *later])

        consumer = Consumer(
            kafka.librdkafka_config()
            | {"group.id": f"reader-{unique_id}", "auto.offset.reset": "earliest"}
        )
        topics = ["profile-updates", "recommendations", "dead-letter"]
        consumer.subscribe([kafka.topic(t) for t in topics])
        seen: dict[str, list[bytes]] = {t: [] for t in topics}

        def done() -> bool:
            folded = {
                e
                for v in seen["profile-updates"]
                for e in ProfileUpdate.model_validate_json(v).trigger_event_ids
            }
            answered = {
                Recommendation.model_validate_json(v).user_id for v in seen["recommendations"]
            }
            return (
                len(folded) == 2 * len(USERS)
                and answered == set(USERS)
                and len(seen["dead-letter"]) >= 4
            )

        deadline = time.monotonic() + WAIT_S
        try:
            while not done():
                counts = {t: len(v) for t, v in seen.items()}
                assert time.monotonic() < deadline, f"not all seen in {WAIT_S:.0f} s: {counts}"
                assert streams.thread.is_alive(), "the stream processor stopped"
                assert workers_thread.is_alive() and not workers_stopped.is_set(), "workers stopped"
                for msg in consumer.consume(num_messages=500, timeout=0.5):
                    if msg.error() is None and msg.value() is not None:
                        seen[msg.topic()[len(kafka.topic_prefix) :]].append(msg.value())
        finally:
            consumer.close()

        assert streams.thread.is_alive()
        assert workers_thread.is_alive() and not workers_stopped.is_set()
        assert store.count() == len(ITEMS)  # every good item after the poison was indexed
        assert streams.streams.catalog.ready.is_set() and len(streams.streams.catalog) == len(ITEMS)

    letters = [DeadLetter.model_validate_json(v) for v in seen["dead-letter"]]
    assert all(len(v) <= DEAD_LETTER_MAX_BYTES for v in seen["dead-letter"])
    got = {(d.source_topic, d.stage, d.error_type): d for d in letters}
    expected = {
        (kafka.topic("behavior-events"), "streams", "too_deep"): poison_events[b"deep-event"],
        (kafka.topic("behavior-events"), "streams", "too_large"): poison_events[b"huge-event"],
        (kafka.topic("item-catalog"), "item-indexer", "too_deep"): poison_catalog[b"deep-item"],
        (kafka.topic("item-catalog"), "item-indexer", "too_large"): poison_catalog[b"huge-item"],
    }
    assert set(expected) <= set(got), sorted(got)
    for where, raw in expected.items():
        letter = got[where]
        assert letter.raw_size == len(raw)
        assert letter.raw_sha256 == hashlib.sha256(raw).hexdigest()
        assert letter.raw_truncated == (len(raw) > 65_536)
