"""Live quality and a shadow recommender on the real broker, the real MiniLM and the embedded
qdrant-edge store: the workers (live and shadow recommender) answer profile updates, then the
users act; live quality counts, per variant, the actions whose item was in the list the user
had, at its rank, and a re-delivered action once."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from prometheus_client import CollectorRegistry

from relata.cli.run_workers import Workers, build_workers
from relata.runtime.topics import ensure_topics, topic_name
from schemas.messages import HistoryEntry, ProfileUpdate, Recommendation
from schemas.quality_settings import QualitySettings, ShadowSettings
from schemas.settings import (
    EncoderSettings,
    IndexerSettings,
    KafkaSettings,
    RecommenderSettings,
    StoreSettings,
)
from schemas.topics import (
    ALL_TOPICS,
    BEHAVIOR_EVENTS,
    ITEM_CATALOG,
    PROFILE_UPDATES,
    RECOMMENDATIONS,
    RECOMMENDATIONS_SHADOW,
)
from workers.edge_store import EdgeVectorStore
from workers.encoder import TransformerEncoder

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "data" / "amazon-beauty"
ITEMS = 160
USERS = 12
WAIT_S = 180.0
# The shadow: fewer items and more diversity than the live recommender.
SHADOW = {"k": 5, "mmr_lambda": 0.5}


def _catalog() -> list[dict[str, Any]]:
    with gzip.open(DATA / "items.jsonl.gz", "rt") as fh:
        return [json.loads(line) for line in itertools.islice(fh, ITEMS)]


def _update(user: str, items: list[str]) -> ProfileUpdate:
    now = datetime.now(UTC)
    history = [
        HistoryEntry(item_id=i, weight=8.0, last_event_type="purchase", last_ts=now, count=1)
        for i in items
    ]
    return ProfileUpdate(
        user_id=user,
        history=history,
        last_event_type="purchase",
        last_item_id=items[0],
        trigger_event_ids=[f"{user}-history"],
        source_ts_ms=int(time.time() * 1000),
        updated_at=now,
    )


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _start(workers: Workers, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=workers.run, args=(stop,), daemon=True)
    thread.start()
    return thread


@pytest.fixture
def running(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> Iterator[tuple[EdgeVectorStore, CollectorRegistry, CollectorRegistry]]:
    ensure_topics(kafka_settings, ALL_TOPICS)
    encoder = TransformerEncoder.from_settings(EncoderSettings(device="cpu"))
    store = EdgeVectorStore(tmp_path / "edge")
    store.ensure_collection(encoder.dim)
    prefix = kafka_settings.topic_prefix
    shadow = ShadowSettings(enabled=True, overrides=SHADOW)
    workers_registry, quality_registry = CollectorRegistry(), CollectorRegistry()
    workers = build_workers(
        "all",
        kafka=kafka_settings,
        encoder_settings=EncoderSettings(),
        store_settings=StoreSettings(kind="edge", path=tmp_path),
        indexer_settings=IndexerSettings(group_id=f"{prefix}indexer", max_batch=128),
        recommender_settings=RecommenderSettings(
            group_id=f"{prefix}recommender", k=10, candidates=50
        ),
        registry=workers_registry,
        encoder=encoder,
        store=store,
        shadow=shadow,
    )
    quality = build_workers(
        "quality",
        kafka=kafka_settings,
        encoder_settings=EncoderSettings(),
        store_settings=StoreSettings(),
        indexer_settings=IndexerSettings(),
        recommender_settings=RecommenderSettings(),
        registry=quality_registry,
        shadow=shadow,
        quality=QualitySettings(
            group_id=f"{prefix}quality", judge_delay_ms=200, commit_interval_ms=100
        ),
    )
    assert [name for name, _ in workers.loops] == ["indexer", "recommender", "fitter", "shadow"]
    stop = threading.Event()
    threads = [_start(workers, stop), _start(quality, stop)]
    try:
        yield store, workers_registry, quality_registry
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        workers.close()
        quality.close()


def _lists(kafka: KafkaSettings, topic: str, users: set[str]) -> dict[str, list[str]]:
    consumer = Consumer(
        kafka.librdkafka_config()
        | {"group.id": f"{kafka.topic_prefix}reader-{topic}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    lists: dict[str, list[str]] = {}
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and set(lists) < users:
        for msg in consumer.consume(num_messages=500, timeout=0.5):
            value = msg.value()
            if msg.error() is None and value is not None:
                rec = Recommendation.model_validate_json(value)
                lists[rec.user_id] = [item.item_id for item in rec.items]
    consumer.close()
    assert set(lists) == users, f"{topic}: no list for {sorted(users - set(lists))}"
    return lists


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_live_metrics_count_hits_of_the_list_in_force_for_live_and_shadow(
    running: tuple[EdgeVectorStore, CollectorRegistry, CollectorRegistry],
    kafka_settings: KafkaSettings,
) -> None:
    store, workers_registry, quality_registry = running
    catalog = _catalog()
    producer = Producer(kafka_settings.librdkafka_producer_config())
    for record in catalog:
        producer.produce(
            topic_name(kafka_settings, ITEM_CATALOG),
            key=record["item_id"].encode(),
            value=json.dumps(record).encode(),
        )
    assert producer.flush(30) == 0
    _wait(lambda: store.count() >= len(catalog), "the catalog to be indexed")

    ids = [record["item_id"] for record in catalog]
    users = {f"user-{n}": ids[n * 3 : n * 3 + 3] for n in range(USERS)}
    for user, history in users.items():
        update = _update(user, history)
        producer.produce(
            topic_name(kafka_settings, PROFILE_UPDATES),
            key=user.encode(),
            value=update.model_dump_json().encode(),
        )
    assert producer.flush(30) == 0
    live = _lists(kafka_settings, topic_name(kafka_settings, RECOMMENDATIONS), set(users))
    shadow = _lists(kafka_settings, topic_name(kafka_settings, RECOMMENDATIONS_SHADOW), set(users))
    assert all(len(items) == 10 for items in live.values())
    assert all(len(items) == SHADOW["k"] for items in shadow.values())

    # Each user acts once: on the item at a chosen rank of the live list (a hit of rank 1, 3
    # or 7), or on an item in neither list (a miss); one action is delivered twice; a view and
    # a user without a list are not judged.
    actions: list[tuple[str, str, str, str]] = []  # event id, user, item, type
    types = ("click", "add_to_cart", "purchase")
    for n, user in enumerate(sorted(users)):
        if n % 4 == 3:
            item = next(i for i in ids if i not in live[user] and i not in shadow[user])
        else:
            item = live[user][(0, 2, 6)[n % 4]]
        actions.append((f"{user}-act", user, item, types[n % 3]))
    events = [
        *actions,
        actions[0],  # re-delivered
        ("view-1", "user-0", live["user-0"][0], "view"),
        ("stranger-1", "stranger", ids[0], "purchase"),
    ]
    for event_id, user, item, event_type in events:
        value = {
            "event_id": event_id,
            "user_id": user,
            "item_id": item,
            "event_type": event_type,
            "ts": datetime.now(UTC).isoformat(),
        }
        producer.produce(
            topic_name(kafka_settings, BEHAVIOR_EVENTS),
            key=user.encode(),
            value=json.dumps(value).encode(),
        )
    assert producer.flush(30) == 0

    def expected(lists: dict[str, list[str]]) -> tuple[dict[str, int], dict[str, float]]:
        hits: dict[str, int] = {t: 0 for t in types}
        ndcg: dict[str, float] = {t: 0.0 for t in types}
        for _, user, item, event_type in actions:
            if item in lists[user]:
                hits[event_type] += 1
                ndcg[event_type] += 1 / math.log2(lists[user].index(item) + 2)
        return hits, ndcg

    def judged(variant: str) -> float:
        return sum(
            _sample(
                quality_registry,
                "relata_quality_events_judged_total",
                variant=variant,
                event_type=t,
            )
            for t in types
        )

    _wait(
        lambda: judged("live") >= len(actions) and judged("shadow") >= len(actions),
        "every action to be judged for both variants",
    )
    time.sleep(1.0)  # nothing more may come (the re-delivery, the view)
    for variant, lists in (("live", live), ("shadow", shadow)):
        hits, ndcg = expected(lists)
        assert judged(variant) == len(actions), variant
        for event_type in types:
            labels = {"variant": variant, "event_type": event_type}
            assert (
                _sample(quality_registry, "relata_quality_hits_total", **labels)
                == (hits[event_type])
            ), labels
            assert _sample(
                quality_registry, "relata_quality_ndcg_total", **labels
            ) == pytest.approx(ndcg[event_type]), labels
        unjudged = "relata_quality_events_unjudged_total"
        assert _sample(quality_registry, unjudged, variant=variant, reason="no_list") == 1
        assert _sample(quality_registry, "relata_quality_lists_total", variant=variant) >= USERS
    assert sum(expected(live)[0].values()) == USERS - USERS // 4  # every planned hit is one
    assert _sample(quality_registry, "relata_quality_duplicates_total") == 1
    # The shadow's lists are not counted as the live recommender's.
    assert _sample(workers_registry, "relata_recommendations_published_total") == USERS
