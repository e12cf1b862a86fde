"""Indexer + recommender on the real broker, the real MiniLM and the embedded qdrant-edge store,
with real amazon-beauty items and histories."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from prometheus_client import CollectorRegistry

from relata.cli.run_workers import Workers, build_workers
from relata.runtime.topics import ensure_topics, topic_name
from schemas.messages import HistoryEntry, ProfileUpdate, Recommendation, RelatedItems
from schemas.reranking import rerank
from schemas.rules import ItemMatch
from schemas.settings import (
    EncoderSettings,
    IndexerSettings,
    KafkaSettings,
    RecommenderSettings,
    StoreSettings,
)
from schemas.topics import (
    ALL_TOPICS,
    DEAD_LETTER,
    ITEM_CATALOG,
    PROFILE_UPDATES,
    RECOMMENDATIONS,
    RELATED_ITEMS,
)
from workers.edge_store import EdgeVectorStore
from workers.encoder import TransformerEncoder

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "data" / "amazon-beauty"
MAX_ITEMS = 300
USERS = 80


def _sample() -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Real users (their first events) and the real items they touched, about MAX_ITEMS."""
    histories: dict[str, list[str]] = defaultdict(list)
    items: set[str] = set()
    with gzip.open(DATA / "events.jsonl.gz", "rt") as fh:
        for line in fh:
            event = json.loads(line)
            user, item = event["user_id"], event["item_id"]
            if item not in items and len(items) >= MAX_ITEMS:
                continue
            if user not in histories and len(histories) >= USERS * 3:
                continue
            items.add(item)
            if item not in histories[user]:
                histories[user].append(item)
            if len(items) >= MAX_ITEMS and len(histories) >= USERS * 3:
                break
    catalog = []
    with gzip.open(DATA / "items.jsonl.gz", "rt") as fh:
        for line in fh:
            record = json.loads(line)
            if record["item_id"] in items:
                catalog.append(record)
    chosen = dict(sorted(histories.items(), key=lambda kv: -len(kv[1]))[:USERS])
    return catalog, chosen


def _update(user: str, items: list[str]) -> ProfileUpdate:
    now = datetime.now(UTC)
    history = [
        HistoryEntry(item_id=i, weight=8.0, last_event_type="purchase", last_ts=now, count=1)
        for i in reversed(items[-20:])  # most recent first
    ]
    return ProfileUpdate(
        user_id=user,
        history=history,
        last_event_type="purchase",
        last_item_id=history[0].item_id,
        trigger_event_ids=[f"{user}-last"],
        source_ts_ms=int(time.time() * 1000),
        updated_at=now,
    )


def _read(consumer: Consumer, *, until: Any, timeout_s: float) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until(out):
        for msg in consumer.consume(num_messages=500, timeout=0.5):
            if msg.error() is None:
                out.append(msg)
    return out


@pytest.fixture
def running(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> Iterator[tuple[Workers, EdgeVectorStore]]:
    ensure_topics(kafka_settings, ALL_TOPICS)
    encoder = TransformerEncoder.from_settings(EncoderSettings(device="cpu"))
    store = EdgeVectorStore(tmp_path / "edge")
    store.ensure_collection(encoder.dim)
    workers = build_workers(
        "all",
        kafka=kafka_settings,
        encoder_settings=EncoderSettings(),
        store_settings=StoreSettings(kind="edge", path=tmp_path),
        indexer_settings=IndexerSettings(
            group_id=f"{kafka_settings.topic_prefix}indexer", max_batch=128
        ),
        recommender_settings=RecommenderSettings(
            group_id=f"{kafka_settings.topic_prefix}recommender", k=10, candidates=50
        ),
        registry=CollectorRegistry(),
        encoder=encoder,
        store=store,
    )
    stop = threading.Event()
    thread = threading.Thread(target=workers.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield workers, store
    finally:
        stop.set()
        thread.join(30)
        workers.close()


def test_pipeline_recommends_for_every_user(
    running: tuple[Workers, EdgeVectorStore], kafka_settings: KafkaSettings
) -> None:
    _, store = running
    catalog, histories = _sample()
    history_items = {i for items in histories.values() for i in items}
    # Retire a tenth of the items no user holds (available=false), plus one by tombstone.
    outside = sorted({r["item_id"] for r in catalog} - history_items)
    retired = set(outside[::10])
    tombstoned = outside[1]
    retired.add(tombstoned)

    producer = Producer(kafka_settings.librdkafka_config())
    catalog_topic = topic_name(kafka_settings, ITEM_CATALOG)
    for record in catalog:
        record = dict(record, available=record["item_id"] not in retired - {tombstoned})
        producer.produce(
            catalog_topic, key=record["item_id"].encode(), value=json.dumps(record).encode()
        )
    producer.produce(catalog_topic, key=b"bad-item", value=b'{"item_id": "bad-item", "price": "x"}')
    producer.produce(catalog_topic, key=tombstoned.encode(), value=None)
    # Behaviour evidence: its retired target must not leak, its available one must arrive.
    some_user, some_items = next(iter(histories.items()))
    source = some_items[-1]  # the user's most recent item
    evidence = RelatedItems.model_validate(
        {
            "item_id": source,
            "item_count": 9.0,
            "related": [
                {
                    "item_id": target,
                    "kind": "bought_together",
                    "score": score,
                    "evidence": {"support": 7, "text": "bought together in 7 baskets"},
                }
                for target, score in ((sorted(retired)[0], 5.0), (outside[2], 4.0))
            ],
            "updated_at": datetime.now(UTC).isoformat(),
        }
    )
    producer.produce(
        topic_name(kafka_settings, RELATED_ITEMS),
        key=source.encode(),
        value=evidence.model_dump_json().encode(),
    )
    assert producer.flush(30) == 0

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        payload = store.get_payloads([tombstoned]).get(tombstoned)
        if store.count() >= len(catalog) and payload is not None and payload["available"] is False:
            break
        time.sleep(0.5)
    assert store.count() == len(catalog)

    updates_topic = topic_name(kafka_settings, PROFILE_UPDATES)
    for user, items in histories.items():
        update = _update(user, items)
        producer.produce(updates_topic, key=user.encode(), value=update.model_dump_json().encode())
    producer.produce(updates_topic, key=b"junk", value=b"\xff\xfe not json")
    producer.produce(
        updates_topic, key=b"u-empty", value=json.dumps({"user_id": "u-empty"}).encode()
    )
    assert producer.flush(30) == 0

    consumer = Consumer(
        kafka_settings.librdkafka_config()
        | {"group.id": f"{kafka_settings.topic_prefix}reader", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe(
        [topic_name(kafka_settings, RECOMMENDATIONS), topic_name(kafka_settings, DEAD_LETTER)]
    )
    rec_topic = topic_name(kafka_settings, RECOMMENDATIONS)

    def done(msgs: list[Any]) -> bool:
        users = {m.key() for m in msgs if m.topic() == rec_topic}
        letters = [m for m in msgs if m.topic() != rec_topic]
        return len(users) >= len(histories) and len(letters) >= 3

    messages = _read(consumer, until=done, timeout_s=180)
    consumer.close()

    recs = {
        r.user_id: r
        for r in (
            Recommendation.model_validate_json(m.value())
            for m in messages
            if m.topic() == rec_topic
        )
    }
    assert set(recs) == set(histories)
    by_id = {r["item_id"]: r for r in catalog}
    used_evidence = False
    for user, rec in recs.items():
        own = set(histories[user])
        assert rec.items, f"user {user} got no items"
        assert rec.model_name == "all-MiniLM-L6-v2"
        assert rec.trigger_event_ids == [f"{user}-last"]
        for item in rec.items:
            assert item.item_id not in own
            assert item.item_id not in retired
            assert all(reason.source_item_id in own for reason in item.reasons)
        used_evidence |= any(r.kind == "bought_together" for i in rec.items for r in i.reasons)
        # The candidate pool: more available items, with the catalog's attributes, to re-rank.
        assert rec.pool is not None and rec.pool.items
        listed = [i.item_id for i in (*rec.items, *rec.pool.items)]
        assert not set(listed) & (own | retired) and len(set(listed)) == len(listed)
        for item_id, attributes in zip(listed, rec.pool.attributes, strict=True):
            record = by_id[item_id]
            assert (attributes.brand, attributes.price) == (
                record.get("brand"),
                record.get("price"),
            )
        # A filter drawn on the pool: only the brand of its last item, from the list or pool.
        brand = rec.pool.attributes[-1].brand
        if brand is not None:
            answer = rerank(rec, match=ItemMatch(brands=[brand]))
            assert answer.items and answer.fallbacks == []
            assert all(by_id[i.item_id].get("brand") == brand for i in answer.items)
    # The available evidence target does arrive, explained by the user's own item.
    assert used_evidence
    evidence_item = next(i for i in recs[some_user].items if i.item_id == outside[2])
    assert evidence_item.reasons[0].source_item_id == source

    letters = [json.loads(m.value()) for m in messages if m.topic() != rec_topic]
    by_stage = {(d["stage"], d["error_type"]) for d in letters}
    assert ("item-indexer", "invalid_fields") in by_stage
    assert ("recommender", "malformed_json") in by_stage
    assert ("recommender", "invalid_fields") in by_stage

    # Every update was answered and acknowledged, so the recommender's group commits the end of
    # profile-updates (AckedProducer: offsets follow the delivery reports), within its interval.
    from confluent_kafka import TopicPartition

    probe = Consumer(
        kafka_settings.librdkafka_config()
        | {"group.id": f"{kafka_settings.topic_prefix}recommender", "enable.auto.commit": False}
    )
    partitions = [
        TopicPartition(updates_topic, p)
        for p in probe.list_topics(updates_topic, timeout=10).topics[updates_topic].partitions
    ]
    ends = {tp.partition: probe.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
    partitions = [tp for tp in partitions if ends[tp.partition] > 0]  # an empty one: no commit
    ends = {p: end for p, end in ends.items() if end > 0}
    assert ends
    committed: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        committed = {tp.partition: tp.offset for tp in probe.committed(partitions, timeout=10)}
        if committed == ends:
            break
        time.sleep(0.5)
    probe.close()
    assert committed == ends


def test_recommender_refits_mid_stream_and_serves_the_winner(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """The background fitter on the real broker, model and store: after enough profile
    updates it fits in its own process while the recommender goes on answering, and swaps a
    winner in; the answers after it name the new model."""
    from schemas.fit_settings import FitSettings
    from workers.ranking import BlendWeights

    ensure_topics(kafka_settings, ALL_TOPICS)
    catalog, histories = _sample()
    weak = tmp_path / "weak.json"  # a start the fit beats: popularity alone
    BlendWeights(vector=0.0, next_item=0.0, also_bought=0.0, bought_together=0.0).save(weak)
    encoder = TransformerEncoder.from_settings(EncoderSettings(device="cpu"))
    store = EdgeVectorStore(tmp_path / "edge")
    store.ensure_collection(encoder.dim)
    registry = CollectorRegistry()
    workers = build_workers(
        "all",
        kafka=kafka_settings,
        encoder_settings=EncoderSettings(),
        store_settings=StoreSettings(kind="edge", path=tmp_path),
        indexer_settings=IndexerSettings(group_id=f"{kafka_settings.topic_prefix}indexer"),
        recommender_settings=RecommenderSettings(
            group_id=f"{kafka_settings.topic_prefix}recommender", candidates=50, blend_path=weak
        ),
        registry=registry,
        encoder=encoder,
        store=store,
        fit_settings=FitSettings(
            min_users=20, every_updates=len(histories), interval_s=3600, nice=0
        ),
    )
    stop = threading.Event()
    thread = threading.Thread(target=workers.run, args=(stop,), daemon=True)
    thread.start()
    producer = Producer(kafka_settings.librdkafka_config())
    consumer = Consumer(
        kafka_settings.librdkafka_config()
        | {"group.id": f"{kafka_settings.topic_prefix}reader", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic_name(kafka_settings, RECOMMENDATIONS)])
    try:
        for record in catalog:
            producer.produce(
                topic_name(kafka_settings, ITEM_CATALOG),
                key=record["item_id"].encode(),
                value=json.dumps(record).encode(),
            )
        assert producer.flush(30) == 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and store.count() < len(catalog):
            time.sleep(0.5)

        def send(round_: int) -> None:
            for user, items in histories.items():
                update = _update(user, items).model_copy(
                    update={"trigger_event_ids": [f"{user}-{round_}"]}
                )
                producer.produce(
                    topic_name(kafka_settings, PROFILE_UPDATES),
                    key=user.encode(),
                    value=update.model_dump_json().encode(),
                )
            assert producer.flush(30) == 0

        def fits(outcome: str) -> float:
            return registry.get_sample_value("relata_fits_total", {"outcome": outcome}) or 0.0

        send(1)  # enough updates: a fit starts
        first = _read(consumer, until=lambda m: len(m) >= len(histories), timeout_s=180)
        assert len(first) >= len(histories)
        # Answered while the fit runs in its process (spawned, it takes seconds to start).
        send(2)
        second = _read(consumer, until=lambda m: len(m) >= len(histories), timeout_s=180)
        assert len(second) >= len(histories)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (fits("swapped") or fits("kept")):
            time.sleep(1)
        assert fits("swapped") == 1, "a fit on real histories beats popularity alone"
        send(3)
        third = _read(consumer, until=lambda m: len(m) >= len(histories), timeout_s=180)
    finally:
        consumer.close()
        stop.set()
        thread.join(30)
        workers.close()
    started = {Recommendation.model_validate_json(m.value()).ranking_version for m in first}
    assert len(started) == 1 and started != {"builtin"}  # the weak blend's own version
    after = {Recommendation.model_validate_json(m.value()).ranking_version for m in third}
    assert len(after) == 1 and after.isdisjoint(started)
    assert next(iter(after)).startswith("fit-")
