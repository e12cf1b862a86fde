"""A model switch in the middle of a replay, on the real broker, the real MiniLM (with and
without an adapter) and the embedded store: `relata reindex` builds the new model's version
while the old one serves, switches, and the workers restart with the new model. No profile
update goes unanswered, and every recommendation is exactly what the version it names makes."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer
from prometheus_client import CollectorRegistry

from relata.cli.reindex import reindex
from relata.cli.run_workers import Workers, build_workers
from relata.runtime.topics import ensure_topics, topic_name
from schemas.messages import HistoryEntry, ProfileUpdate, Recommendation
from schemas.settings import (
    EncoderSettings,
    IndexerSettings,
    KafkaSettings,
    RecommenderSettings,
    StoreSettings,
)
from schemas.topics import ALL_TOPICS, ITEM_CATALOG, PROFILE_UPDATES, RECOMMENDATIONS
from tests.unit.worker_fakes import FakeConsumer, FakeProducer
from workers.adapter import save_adapter
from workers.encoder import TransformerEncoder
from workers.metrics import WorkerMetrics
from workers.micro_batch import PendingUser, RecommenderTopics
from workers.recommender import Recommender
from workers.store_versions import EdgeVersions
from workers.vector_store import ModelIdentity

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "data" / "amazon-beauty"
ITEMS = 150
# Profile updates per phase: before the reindex, during it, after the switch (old workers
# still up), after the restart with the new model.
PER_PHASE = 12
COLLECTION = "items"


def _catalog() -> list[dict[str, Any]]:
    with gzip.open(DATA / "items.jsonl.gz", "rt") as fh:
        return [json.loads(line) for _, line in zip(range(ITEMS), fh, strict=False)]


def _updates(item_ids: list[str]) -> list[ProfileUpdate]:
    """Four phases of updates, each with a history of 3-5 catalog items and its own trigger."""
    rng = np.random.default_rng(7)
    now = datetime.now(UTC)
    updates = []
    for n in range(4 * PER_PHASE):
        picked = rng.choice(item_ids, size=int(rng.integers(3, 6)), replace=False)
        history = [
            HistoryEntry(item_id=str(i), weight=4.0, last_event_type="view", last_ts=now, count=1)
            for i in picked
        ]
        updates.append(
            ProfileUpdate(
                user_id=f"u{n}",
                history=history,
                last_event_type="view",
                last_item_id=history[0].item_id,
                trigger_event_ids=[f"e{n}"],
                source_ts_ms=int(time.time() * 1000),
                updated_at=now,
            )
        )
    return updates


class Running:
    """`relata workers --role all` in a thread, as its entry point builds it."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self.stop = threading.Event()
        self.thread = threading.Thread(target=workers.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.workers.close()


@pytest.fixture
def adapter_settings(tmp_path: Path) -> EncoderSettings:
    """The packaged model with a linear adapter: same width, other vectors (and rankings)."""
    rng = np.random.default_rng(3)
    weight = np.eye(384) + 0.6 * rng.standard_normal((384, 384)) / np.sqrt(384)
    path = save_adapter(tmp_path / "adapter", weight, np.zeros(384), {"purpose": "test"})
    return EncoderSettings(device="cpu", adapter_path=path)


@pytest.fixture
def old_encoder() -> Iterator[TransformerEncoder]:
    encoder = TransformerEncoder.from_settings(EncoderSettings(device="cpu"))
    yield encoder
    encoder.close()


def test_switching_the_model_mid_replay_loses_and_mixes_nothing(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    old_encoder: TransformerEncoder,
    adapter_settings: EncoderSettings,
) -> None:
    ensure_topics(kafka_settings, ALL_TOPICS)
    store_settings = StoreSettings(kind="edge", path=tmp_path / "store", collection=COLLECTION)
    indexer_settings = IndexerSettings(
        group_id=f"{kafka_settings.topic_prefix}indexer", max_batch=64
    )
    recommender_settings = RecommenderSettings(
        group_id=f"{kafka_settings.topic_prefix}recommender", k=5, candidates=30
    )

    def start(encoder: TransformerEncoder) -> Running:
        return Running(
            build_workers(
                "all",
                kafka=kafka_settings,
                encoder_settings=EncoderSettings(),
                store_settings=store_settings,
                indexer_settings=indexer_settings,
                recommender_settings=recommender_settings,
                registry=CollectorRegistry(),
                encoder=encoder,
            )
        )

    catalog = _catalog()
    updates = _updates([r["item_id"] for r in catalog])
    producer = Producer(kafka_settings.librdkafka_config())

    def send(phase: int) -> None:
        topic = topic_name(kafka_settings, PROFILE_UPDATES)
        for update in updates[phase * PER_PHASE : (phase + 1) * PER_PHASE]:
            producer.produce(topic, key=update.user_id.encode(), value=update.model_dump_json())
        assert producer.flush(30) == 0

    for record in catalog:
        producer.produce(
            topic_name(kafka_settings, ITEM_CATALOG),
            key=record["item_id"].encode(),
            value=json.dumps(record).encode(),
        )
    assert producer.flush(30) == 0

    # The old model serves: its workers make the store's first version.
    old = start(old_encoder)
    deadline = time.monotonic() + 60
    while old.workers.store.count() < len(catalog) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert old.workers.store.count() == len(catalog)
    send(0)

    # The new model's version is built beside it while updates keep coming, then switched.
    new_encoder = TransformerEncoder.from_settings(adapter_settings)
    old_model, new_model = ModelIdentity.of(old_encoder), ModelIdentity.of(new_encoder)
    assert old_model.version != new_model.version
    versions = EdgeVersions(store_settings.path, COLLECTION)
    send(1)
    result = reindex(
        kafka=kafka_settings,
        encoder=new_encoder,
        versions=versions,
        indexer_settings=indexer_settings,
    )
    assert (result.points, result.switched, result.replaced) == (
        len(catalog),
        True,
        old_model.version,
    )
    assert (versions.current(), versions.previous()) == (new_model, old_model)
    send(2)  # still answered by the old workers, from the version they opened

    # The workers restart with the new model; its indexer goes on from the reindex position.
    old.close()
    new = start(new_encoder)
    try:
        send(3)
        out = Consumer(
            kafka_settings.librdkafka_config()
            | {"group.id": f"{kafka_settings.topic_prefix}check", "auto.offset.reset": "earliest"}
        )
        out.subscribe([topic_name(kafka_settings, RECOMMENDATIONS)])
        wanted = {u.trigger_event_ids[0] for u in updates}
        answered: set[str] = set()
        records: list[tuple[int, Recommendation]] = []
        deadline = time.monotonic() + 60
        while not wanted <= answered and time.monotonic() < deadline:
            for msg in out.consume(num_messages=500, timeout=0.5):
                if msg.error() is None:
                    rec = Recommendation.model_validate_json(msg.value())
                    records.append((msg.partition(), rec))
                    answered.update(rec.trigger_event_ids)
        out.close()
    finally:
        new.close()

    # No update lost.
    assert wanted <= answered, sorted(wanted - answered)
    # Each names one version, of the model that made it; both served; per partition the old
    # model's answers all come before the new model's.
    named = [(p, rec.vectors_version, rec.model_version) for p, rec in records]
    assert all(v == m and v in (old_model.version, new_model.version) for _, v, m in named)
    assert {v for _, v, _ in named} == {old_model.version, new_model.version}
    for partition in {p for p, _, _ in named}:
        order = [v for p, v, _ in named if p == partition]
        switched_at = order.index(new_model.version) if new_model.version in order else len(order)
        assert set(order[switched_at:]) == {new_model.version}, order

    # None mixes versions: each list is exactly what the version it names makes, and the
    # other version makes different lists (so a mixed answer would show).
    by_update = {u.trigger_event_ids[0]: u for u in updates}
    encoders = {old_model.version: old_encoder, new_model.version: new_encoder}
    differ = 0
    for version, encoder in encoders.items():
        model = ModelIdentity.of(encoder)
        store = versions.open(encoder.dim, model)
        offline = Recommender(
            consumer=FakeConsumer("updates"),
            related_consumer=None,
            producer=FakeProducer(),
            encoder=encoder,
            store=store,
            metrics=WorkerMetrics.create(CollectorRegistry()),
            topics=RecommenderTopics("updates", "related", "recommendations", "dead-letter"),
            settings=recommender_settings,
        )
        try:
            for _, rec in records:
                update = by_update[rec.trigger_event_ids[0]]
                (items,) = offline.recommend(
                    [PendingUser(update, list(update.trigger_event_ids), update.source_ts_ms)]
                )
                same = [i.item_id for i in items] == [i.item_id for i in rec.items]
                if rec.vectors_version == version:
                    assert same, (version, rec.user_id)
                    assert [i.score for i in items] == pytest.approx(
                        [i.score for i in rec.items], abs=1e-4
                    )
                else:
                    differ += not same
        finally:
            store.close()
    new_encoder.close()
    assert differ > len(records) // 2
