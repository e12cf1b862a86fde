"""Item indexer: micro-batches, retire, dead-letter, commit after the store write."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from kafkaio.producer import DeliveryError
from tests.unit.worker_fakes import FakeConsumer, FakeEncoder, FakeProducer
from workers.client_store import ClientVectorStore
from workers.indexer import IndexerTopics, ItemIndexer
from workers.metrics import WorkerMetrics
from workers.model_identity import version_group
from workers.vector_store import ModelIdentity, ModelMismatchError

TOPICS = IndexerTopics(catalog="item-catalog", dead_letter="dead-letter")


def _item(item_id: str, title: str, **extra: object) -> dict[str, object]:
    return {"item_id": item_id, "title": title, "categories": ["Beauty", "Lips"], **extra}


@pytest.fixture
def store() -> Iterator[ClientVectorStore]:
    s = ClientVectorStore(collection="items", path=":memory:")
    s.ensure_collection(FakeEncoder.dim)
    yield s
    s.close()


def _indexer(
    consumer: FakeConsumer,
    producer: FakeProducer,
    store: ClientVectorStore,
    *,
    max_batch: int = 100,
) -> tuple[ItemIndexer, WorkerMetrics, FakeEncoder]:
    metrics = WorkerMetrics.create(CollectorRegistry())
    encoder = FakeEncoder()
    indexer = ItemIndexer(
        consumer=consumer,
        producer=producer,
        encoder=encoder,
        store=store,
        metrics=metrics,
        topics=TOPICS,
        max_batch=max_batch,
        max_wait_ms=1,
    )
    return indexer, metrics, encoder


def test_indexes_items_with_payload_and_commits(store: ClientVectorStore) -> None:
    consumer, producer = FakeConsumer("item-catalog"), FakeProducer()
    consumer.add_json(_item("a", "red lipstick", brand="Acme", price=3.5), key="a")
    consumer.add_json(_item("b", "dry shampoo"), key="b")
    indexer, metrics, encoder = _indexer(consumer, producer, store)
    result = indexer.poll_once()
    assert (result.records, result.indexed, result.retired, result.dead_letters) == (2, 2, 0, 0)
    assert store.count() == 2
    payload = store.get_payloads(["a"])["a"]
    assert payload["title"] == "red lipstick"
    assert payload["brand"] == "Acme"
    assert payload["price"] == 3.5
    assert payload["categories"] == ["Beauty", "Lips"]
    assert payload["available"] is True
    assert encoder.calls == [
        [
            "red lipstick. Brand: Acme. Category: Beauty > Lips",
            "dry shampoo. Category: Beauty > Lips",
        ]
    ]
    assert consumer.commits == [2]
    assert metrics.items_indexed._value.get() == 2
    assert metrics.encoded_texts._value.get() == 2


def test_micro_batches_respect_max_batch(store: ClientVectorStore) -> None:
    consumer, producer = FakeConsumer("item-catalog"), FakeProducer()
    for n in range(5):
        consumer.add_json(_item(f"i{n}", f"item {n}"), key=f"i{n}")
    indexer, _, encoder = _indexer(consumer, producer, store, max_batch=2)
    assert [indexer.poll_once().records for _ in range(4)] == [2, 2, 1, 0]
    assert [len(c) for c in encoder.calls] == [2, 2, 1]
    assert consumer.commits == [2, 4, 5]
    assert store.count() == 5


def test_retire_by_flag_and_tombstone_keeps_vectors(store: ClientVectorStore) -> None:
    consumer, producer = FakeConsumer("item-catalog"), FakeProducer()
    consumer.add_json(_item("a", "red lipstick"), key="a")
    consumer.add_json(_item("b", "pink lipstick"), key="b")
    indexer, metrics, _ = _indexer(consumer, producer, store)
    indexer.poll_once()
    consumer.add_json(_item("a", "red lipstick", available=False), key="a")
    consumer.add(None, key=b"b")
    consumer.add(None, key=b"never-indexed")
    result = indexer.poll_once()
    assert result.retired == 2
    assert metrics.items_retired._value.get() == 2
    assert store.search(store.get_vectors(["a"])["a"], k=5) == []
    assert set(store.get_vectors(["a", "b"])) == {"a", "b"}
    assert store.count() == 2


def test_last_record_of_an_item_in_a_batch_wins(store: ClientVectorStore) -> None:
    consumer, producer = FakeConsumer("item-catalog"), FakeProducer()
    consumer.add_json(_item("a", "old title"), key="a")
    consumer.add_json(_item("a", "new title"), key="a")
    indexer, _, encoder = _indexer(consumer, producer, store)
    indexer.poll_once()
    assert store.get_payloads(["a"])["a"]["title"] == "new title"
    assert len(encoder.calls[0]) == 1


def test_bad_records_go_to_dead_letter_and_good_ones_flow(store: ClientVectorStore) -> None:
    consumer, producer = FakeConsumer("item-catalog"), FakeProducer()
    consumer.add(b"{not json", key=b"x")
    consumer.add_json({"item_id": "y", "price": -1}, key="y")
    consumer.add_json(_item("z", "mismatched key"), key="other")
    consumer.add_json(_item("ok", "good item"), key="ok")
    indexer, metrics, _ = _indexer(consumer, producer, store)
    result = indexer.poll_once()
    assert result.dead_letters == 3
    assert store.count() == 1
    letters = producer.values("dead-letter")
    assert [d["error_type"] for d in letters] == [
        "malformed_json",
        "invalid_fields",
        "invalid_fields",
    ]
    assert all(
        d["stage"] == "item-indexer" and d["source_topic"] == "item-catalog" for d in letters
    )
    assert "does not match" in letters[2]["reason"]
    assert json.loads(base64.b64decode(letters[1]["raw_value_b64"]))["item_id"] == "y"
    assert producer.flushed == 3
    assert consumer.commits == [4]
    labels = {"stage": "item-indexer", "error_type": "invalid_fields"}
    assert metrics.dead_letter.labels(**labels)._value.get() == 2


def test_a_refused_dead_letter_stops_the_indexer_before_the_commit(
    store: ClientVectorStore,
) -> None:
    consumer, producer = FakeConsumer("item-catalog"), FakeProducer()
    producer.refuse_topics = {"dead-letter"}
    consumer.add(b"{not json", key=b"x")
    indexer, _, _ = _indexer(consumer, producer, store)
    with pytest.raises(DeliveryError, match="refused by the broker"):
        indexer.poll_once()
    assert consumer.commits == []


def test_reprocessing_a_batch_is_idempotent(store: ClientVectorStore) -> None:
    consumer, producer = FakeConsumer("item-catalog"), FakeProducer()
    consumer.add_json(_item("a", "red lipstick"), key="a")
    indexer, _, _ = _indexer(consumer, producer, store)
    indexer.poll_once()
    consumer.consumed = 0  # a crash before commit re-delivers the batch
    indexer.poll_once()
    assert store.count() == 1


def test_indexer_writes_only_into_its_models_version() -> None:
    consumer, producer = FakeConsumer("item-catalog"), FakeProducer()
    mine = ClientVectorStore(
        collection="items", path=":memory:", model=ModelIdentity.of(FakeEncoder())
    )
    mine.ensure_collection(FakeEncoder.dim)
    consumer.add_json(_item("a", "red lipstick"), key="a")
    indexer, _, encoder = _indexer(consumer, producer, mine)
    indexer.poll_once()
    assert mine.get_payloads(["a"])["a"]["model_version"] == encoder.version
    mine.close()

    other = ClientVectorStore(
        collection="items", path=":memory:", model=ModelIdentity("fake", "another")
    )
    other.ensure_collection(FakeEncoder.dim)
    with pytest.raises(ModelMismatchError, match=r"another.*v1"):
        _indexer(consumer, producer, other)
    other.close()


def test_each_model_version_has_its_own_catalog_position() -> None:
    assert version_group("relata-indexer", "abc") == "relata-indexer-abc"
    assert version_group("relata-indexer", "abc") != version_group("relata-indexer", "def")
