"""`similar` with every store kind: the item indexer publishes each indexed item's nearest
neighbours to `similar-items`, and the stream processor serves them from its view of that
topic, with the items whose lists hold the item merged in, never an unavailable one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kafkaio.producer import DeliveryError
from schemas.messages import RelatedItem, SimilarList
from schemas.settings import KafkaSettings, StreamsSettings
from streams.app import build_streams
from streams.catalog import CatalogView
from streams.similar import SimilarView
from streams.web import related_body
from tests.unit.test_streams_app import RecordingSender
from tests.unit.worker_fakes import FakeConsumer, FakeEncoder, FakeProducer
from workers.client_store import ClientVectorStore
from workers.indexer import IndexerTopics, ItemIndexer
from workers.metrics import WorkerMetrics

TOPICS = IndexerTopics(catalog="item-catalog", dead_letter="dead-letter", similar="similar-items")
T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture
def store() -> Iterator[ClientVectorStore]:
    s = ClientVectorStore(collection="items", path=":memory:")
    s.ensure_collection(FakeEncoder.dim)
    yield s
    s.close()


def _indexer(
    store: ClientVectorStore, *, similar_k: int = 2, topics: IndexerTopics = TOPICS
) -> tuple[ItemIndexer, FakeConsumer, FakeProducer]:
    consumer, producer = FakeConsumer("item-catalog"), FakeProducer()
    indexer = ItemIndexer(
        consumer=consumer,
        producer=producer,
        encoder=FakeEncoder(),
        store=store,
        metrics=WorkerMetrics.create(CollectorRegistry()),
        topics=topics,
        max_wait_ms=1,
        similar_k=similar_k,
    )
    return indexer, consumer, producer


def _item(item_id: str, title: str, **extra: object) -> dict[str, object]:
    return {"item_id": item_id, "title": title, **extra}


def _lists(producer: FakeProducer) -> dict[str, SimilarList | None]:
    """The latest similar list (None: a tombstone) per item, as compaction keeps them."""
    latest: dict[str, SimilarList | None] = {}
    for topic, key, value in producer.records:
        if topic == "similar-items" and key is not None:
            latest[key.decode()] = None if value is None else SimilarList.model_validate_json(value)
    return latest


def _ids(similar: SimilarList | None) -> list[str]:
    assert similar is not None
    return [r.item_id for r in similar.related]


# -- the indexer ---------------------------------------------------------------------------------


def test_each_indexed_item_gets_its_nearest_available_neighbours(
    store: ClientVectorStore,
) -> None:
    indexer, consumer, producer = _indexer(store)
    consumer.add_json(_item("red", "red matte lipstick"), key="red")
    consumer.add_json(_item("pink", "pink matte lipstick"), key="pink")
    consumer.add_json(_item("shampoo", "dry shampoo volume"), key="shampoo")
    result = indexer.poll_once()
    assert result.similar_lists == 3
    lists = _lists(producer)
    red = lists["red"]
    assert red is not None and _ids(red)[0] == "pink" and "red" not in _ids(red)
    assert len(red.related) == 2 and all(r.kind == "similar" for r in red.related)
    cosine = red.related[0].evidence.cosine
    assert cosine is not None and 0 < cosine <= 1 and red.related[0].score == cosine
    assert red.model_name == "fake"
    # Committed only once the lists are acknowledged.
    assert producer.flushed == len(producer.records) and consumer.commits == [3]


def test_a_retired_item_gets_a_tombstone_and_leaves_the_lists_made_after(
    store: ClientVectorStore,
) -> None:
    indexer, consumer, producer = _indexer(store, similar_k=5)
    for item_id, title in (("red", "red lipstick"), ("pink", "pink lipstick"), ("nude", "nude")):
        consumer.add_json(_item(item_id, title), key=item_id)
    indexer.poll_once()
    assert "pink" in _ids(_lists(producer)["red"])
    consumer.add_json(_item("pink", "pink lipstick", available=False), key="pink")
    consumer.add(None, key=b"nude")
    consumer.add_json(_item("coral", "coral lipstick"), key="coral")
    indexer.poll_once()
    lists = _lists(producer)
    assert lists["pink"] is None and lists["nude"] is None
    assert set(_ids(lists["coral"])) == {"red"}  # never a retired item


def test_no_topic_or_no_neighbours_asked_publishes_nothing(store: ClientVectorStore) -> None:
    for indexer, consumer, producer in (
        _indexer(store, similar_k=0),
        _indexer(store, topics=IndexerTopics(catalog="item-catalog", dead_letter="dead-letter")),
    ):
        consumer.add_json(_item("red", "red lipstick"), key="red")
        assert indexer.poll_once().similar_lists == 0
        assert producer.records == [] and consumer.commits == [1]


def test_a_refused_similar_list_stops_the_indexer_before_the_commit(
    store: ClientVectorStore,
) -> None:
    indexer, consumer, producer = _indexer(store)
    producer.refuse_topics = {"similar-items"}
    consumer.add_json(_item("red", "red lipstick"), key="red")
    with pytest.raises(DeliveryError):
        indexer.poll_once()
    assert consumer.commits == []


# -- the stream processor's view -----------------------------------------------------------------


def _record(item_id: str, *pairs: tuple[str, float], at: int = 0) -> bytes:
    return (
        SimilarList(
            item_id=item_id,
            related=[RelatedItem.similar(other, cosine) for other, cosine in pairs],
            model_name="m",
            vectors_version="v1",
            updated_at=T0 + timedelta(seconds=at),
        )
        .model_dump_json()
        .encode()
    )


def _view(**categories: tuple[str, ...]) -> SimilarView:
    catalog = CatalogView()
    catalog.set_items(categories or {i: ("Lips",) for i in ("a", "b", "c", "new", "x")})
    return SimilarView(catalog)


def _served(
    view: SimilarView, item_id: str, k: int = 10, **options: Any
) -> list[tuple[str, float]]:
    found = view.similar(item_id, k=k, categories=options.get("categories"))
    assert found is not None
    return [(r.item_id, round(r.score, 2)) for r in found]


def test_a_new_item_joins_the_lists_of_the_items_it_is_close_to() -> None:
    view = _view()
    view.apply(b"a", _record("a", ("b", 0.9)))
    view.apply(b"b", _record("b", ("a", 0.9)))
    assert _served(view, "a") == [("b", 0.9)]
    # `new` is indexed later: its list names a and b, whose own lists were not remade.
    view.apply(b"new", _record("new", ("a", 0.95), ("b", 0.5), at=10))
    assert _served(view, "a") == [("new", 0.95), ("b", 0.9)]
    assert _served(view, "b") == [("a", 0.9), ("new", 0.5)]
    assert _served(view, "new", k=1) == [("a", 0.95)]
    assert view.similar("unknown", k=3, categories=None) is None


def test_the_newer_list_says_the_cosine_of_a_pair_and_tombstones_withdraw_a_list() -> None:
    view = _view()
    view.apply(b"a", _record("a", ("b", 0.9), at=0))
    view.apply(b"b", _record("b", ("a", 0.6), at=5))  # b re-indexed since: a new vector
    assert _served(view, "a") == [("b", 0.6)]
    view.apply(b"b", _record("b", ("c", 0.7), at=6))  # a left b's list
    assert _served(view, "a") == [("b", 0.9)]
    assert _served(view, "c") == [("b", 0.7)]
    view.apply(b"b", None)
    assert _served(view, "a") == [("b", 0.9)]  # a's own list, until the catalog retires b
    assert view.similar("c", k=3, categories=None) is None
    view.apply(b"a", b"{not json")  # skipped, the list kept
    assert _served(view, "a") == [("b", 0.9)]


def test_same_category_keeps_the_neighbours_that_share_one() -> None:
    view = _view(a=("Lips",), b=("Lips", "Matte"), c=("Nails",))
    view.apply(b"a", _record("a", ("c", 0.9), ("b", 0.8)))
    assert _served(view, "a", categories=("Lips",)) == [("b", 0.8)]
    assert _served(view, "a") == [("c", 0.9), ("b", 0.8)]


def test_http_similar_from_the_topic_never_shows_an_unavailable_item(tmp_path: Path) -> None:
    async def scenario() -> None:
        app = build_streams(
            kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
            settings=StreamsSettings(web_port=0, data_dir=tmp_path),
            registry=CollectorRegistry(),
            sender=RecordingSender(),
            follow_topics=False,
        )
        view = app.similar
        assert isinstance(view, SimilarView)  # no vector store given: the topic's view
        app.catalog.set_items({"a": ("Lips",), "b": ("Lips",), "new": ("Lips",)})
        view.apply(b"a", _record("a", ("retired", 0.99), ("b", 0.9)))
        view.apply(b"x", _record("x", ("a", 0.98)))  # x is not in the catalog either
        view.apply(b"new", _record("new", ("a", 0.95)))
        body = await related_body(app, item_id="a", k=5, kind="similar", same_category=False)
        assert [r.item_id for r in body.related] == ["new", "b"]
        assert body.similar_available and all(r.kind == "similar" for r in body.related)
        both = await related_body(app, item_id="a", k=1, kind="all", same_category=False)
        assert [r.item_id for r in both.related] == ["new"]

    asyncio.run(scenario())
