"""Poison records at every consumer: each becomes a dead letter (or a reported line) and the
stage goes on with the records after it. Hostile shapes: nesting 5000 deep, ~990 KB values,
strict-field violations, conflicting duplicates, and processing errors of one record."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from prometheus_client import CollectorRegistry

import streams.profiles_agent as profiles_agent_module
from kafkaio.producer import RecordRefusedError
from relata.runtime.replay import publish_catalog, replay_events
from relata.runtime.tail import TailRecord
from schemas.messages import DEAD_LETTER_MAX_BYTES, DeadLetter
from schemas.settings import RecommenderSettings
from streams.catalog import CatalogView
from streams.records import Record
from tests.unit.test_streams_app import (
    RecordingSender,
    association_agent,
    dead_letters,
    encode,
    event,
    make_streams,
    put_events,
    run_async,
)
from tests.unit.worker_fakes import FakeConsumer, FakeEncoder, FakeProducer
from workers.client_store import ClientVectorStore
from workers.indexer import IndexerTopics, ItemIndexer
from workers.metrics import WorkerMetrics
from workers.micro_batch import RecommenderTopics
from workers.recommender import Recommender

DEEP = 5000


def deep_array(depth: int = DEEP) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_object(depth: int = DEEP) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def huge(data: dict[str, Any], field: str = "item_id", size: int = 990_000) -> bytes:
    """`data` with `field` padded so the record is about `size` bytes (under Kafka's 1 MB)."""
    raw = json.dumps({**data, field: "x" * size}).encode()
    assert 950_000 < len(raw) < 1_000_000
    return raw


def letters_by_type(letters: list[DeadLetter]) -> dict[str, list[DeadLetter]]:
    out: dict[str, list[DeadLetter]] = {}
    for letter in letters:
        out.setdefault(letter.error_type, []).append(letter)
    return out


def assert_bounded(letter: DeadLetter, raw: bytes) -> None:
    assert len(letter.model_dump_json()) <= DEAD_LETTER_MAX_BYTES
    assert letter.raw_size == len(raw)
    assert letter.raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert raw.startswith(base64.b64decode(letter.raw_value_b64 or ""))


# -- the profile agent (behavior-events) ------------------------------------------------------


@run_async
async def test_poison_events_are_dead_lettered_and_good_ones_still_fold(tmp_path: Path) -> None:
    sender = RecordingSender()
    streams = make_streams(tmp_path, sender, batch_max_events=20)
    big = huge(event(3))
    poison = [
        (b"u1", deep_array()),
        (b"u1", deep_object()),
        (b"u1", big),
        (b"u1", encode(event(4, quantity=True))),
        (b"u1", encode({**event(5), "ts": 1_700_000_000})),
        (b"u1\x00", encode(event(6, user="u1\x00"))),
    ]
    await put_events(streams, [(b"u1", encode(event(1))), *poison, (b"u1", encode(event(2)))])
    updates = sender.values("profile-updates")
    assert [json.loads(u)["trigger_event_ids"] for u in updates] == [["e1", "e2"]]
    by_type = letters_by_type(dead_letters(sender))
    assert {k: len(v) for k, v in by_type.items()} == {
        "too_deep": 2,
        "too_large": 1,
        "invalid_fields": 3,
    }
    assert_bounded(by_type["too_large"][0], big)
    reasons = " ".join(letter.reason for letter in by_type["invalid_fields"])
    assert "quantity" in reasons and "ts" in reasons and "user_id" in reasons
    dead = streams.registry.get_sample_value(
        "relata_dead_letter_total", {"stage": "streams", "error_type": "too_deep"}
    )
    assert dead == 2


@run_async
async def test_hostile_conflicting_duplicate_is_dead_lettered_and_exact_one_counted(
    tmp_path: Path,
) -> None:
    sender = RecordingSender()
    streams = make_streams(tmp_path, sender)
    first = encode(event(1, item="i1"))
    await put_events(
        streams,
        [(b"u1", first), (b"u1", first), (b"u1", encode(event(1, item="i2"))), (b"u1", first)],
    )
    assert len(sender.values("profile-updates")) == 1
    (letter,) = dead_letters(sender)
    assert letter.error_type == "conflicting_duplicate"
    assert "e1" in letter.reason and letter.offset == 2
    assert streams.registry.get_sample_value("relata_events_duplicate_total") == 2


@run_async
async def test_poison_a_processing_error_dead_letters_only_its_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = RecordingSender()
    streams = make_streams(tmp_path, sender, batch_max_events=10)
    real = profiles_agent_module.profile_update

    def failing(profile: Any, **kwargs: Any) -> Any:
        if profile.user_id == "u2":
            raise RuntimeError("boom")
        return real(profile, **kwargs)

    monkeypatch.setattr(profiles_agent_module, "profile_update", failing)
    await put_events(
        streams,
        [
            (b"u1", encode(event(1))),
            (b"u2", encode(event(2, user="u2"))),
            (b"u1", encode(event(3))),
        ],
    )
    assert [json.loads(u)["user_id"] for u in sender.values("profile-updates")] == ["u1"]
    (letter,) = dead_letters(sender)
    assert (letter.error_type, letter.offset) == ("processing_error", 1)
    assert "RuntimeError: boom" in letter.reason
    # Nothing of u2 was stored: the event is folded when it comes again.
    assert streams.profiles is not None and streams.profiles.get(0, "u2") is None


class RefusingSender(RecordingSender):
    """A sender whose producer refuses every record of `topic` (as if too large)."""

    def __init__(self, topic: str) -> None:
        super().__init__()
        self.topic = topic

    def produce(
        self, topic: str, *, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None:
        if self.topic in topic:
            raise RecordRefusedError(f"{topic}: too large", topic=topic, size=2_000_000)
        super().produce(topic, key=key, value=value, partition=partition)


@run_async
async def test_poison_an_output_the_producer_refuses_dead_letters_its_input(
    tmp_path: Path,
) -> None:
    for topic, what in (("profiles-changelog", "its profile"), ("profile-updates", "update")):
        sender = RefusingSender(topic)
        streams = make_streams(tmp_path / topic, sender)
        await put_events(streams, [(b"u1", encode(event(1))), (b"u1", encode(event(2)))])
        letters = dead_letters(sender)
        assert [(x.error_type, x.offset) for x in letters] == [
            ("processing_error", 0),
            ("processing_error", 1),
        ]
        assert all(what in x.reason and "could not be produced" in x.reason for x in letters)
        assert sender.values("profile-updates") == []


# -- the association agent (association-input) ------------------------------------------------


@run_async
async def test_poison_association_inputs_are_dead_lettered_and_good_ones_count(
    tmp_path: Path,
) -> None:
    sender = RecordingSender()
    streams = make_streams(tmp_path, sender)
    good = {"item_id": "i1", "ts": 1.0, "kind": "bought_together", "basket_items": ["i2"]}

    def record(offset: int, value: bytes | None) -> Record:
        return Record(None, value, "association-input", 0, offset, 0.0)

    await association_agent(streams).handle_association_batch(
        [
            record(0, deep_array()),
            record(1, b"{not json"),
            record(2, json.dumps([good, {"item_id": "i2"}, 7, {**good, "ts": "NaN"}]).encode()),
            record(3, None),
            record(4, json.dumps([good]).encode()),
        ]
    )
    letters = dead_letters(sender)
    assert [(x.error_type, x.offset) for x in letters] == [
        ("too_deep", 0),
        ("malformed_json", 1),
        ("invalid_fields", 2),
        ("invalid_fields", 3),
    ]
    assert "3 invalid association inputs" in letters[2].reason
    assert streams.registry.get_sample_value("relata_association_updates_total") == 2


# -- the catalog view (item-catalog, in the stream processor) ---------------------------------


def test_poison_catalog_records_are_skipped_by_the_catalog_view() -> None:
    view = CatalogView()
    for raw in (
        deep_array(),
        deep_object(),
        huge({"item_id": "i9"}, "description"),
        b'{"item_id": "i8", "price": true}',
        b"\xff\xfe",
    ):
        view.apply(b"k", raw)
    view.apply(b"i1", b'{"item_id": "i1", "categories": ["Hair"]}')
    view.apply(b"\xff", None)  # a tombstone with a key that is not UTF-8
    assert len(view) == 1 and view.categories("i1") == ("Hair",)


# -- the item indexer (item-catalog) ----------------------------------------------------------


@pytest.fixture
def store() -> Iterator[ClientVectorStore]:
    s = ClientVectorStore(collection="items", path=":memory:")
    s.ensure_collection(FakeEncoder.dim)
    yield s
    s.close()


def indexer(
    consumer: FakeConsumer, producer: FakeProducer, store: ClientVectorStore, encoder: Any
) -> tuple[ItemIndexer, WorkerMetrics]:
    metrics = WorkerMetrics.create(CollectorRegistry())
    topics = IndexerTopics(catalog="item-catalog", dead_letter="dead-letter")
    loop = ItemIndexer(
        consumer=consumer,
        producer=producer,
        encoder=encoder,
        store=store,
        metrics=metrics,
        topics=topics,
        max_wait_ms=1,
    )
    return loop, metrics


def test_poison_catalog_records_are_dead_lettered_by_the_indexer(store: ClientVectorStore) -> None:
    consumer, producer = FakeConsumer("item-catalog"), FakeProducer()
    big = huge({"item_id": "big"}, "description")
    consumer.add_json({"item_id": "a", "title": "red lipstick"}, key="a")
    consumer.add(deep_array(), key=b"deep")
    consumer.add(big, key=b"big")
    consumer.add(b'{"item_id": "p", "price": true}', key=b"p")
    consumer.add(b'{"item_id": "c", "title": "mug\\u0000"}', key=b"c")
    consumer.add_json({"item_id": "b", "title": "dry shampoo"}, key="b")
    loop, _ = indexer(consumer, producer, store, FakeEncoder())
    result = loop.poll_once()
    assert (result.indexed, result.dead_letters) == (2, 4)
    assert store.count() == 2
    letters = [DeadLetter.model_validate(v) for v in producer.values("dead-letter")]
    assert [x.error_type for x in letters] == [
        "too_deep",
        "too_large",
        "invalid_fields",
        "invalid_fields",
    ]
    assert_bounded(letters[1], big)
    assert consumer.commits == [6]


class PickyEncoder(FakeEncoder):
    """An encoder that raises on any batch holding a text with "poison"."""

    def encode(self, texts: Any) -> Any:
        if any("poison" in text for text in texts):
            raise ValueError("cannot encode this text")
        return super().encode(texts)


def test_poison_an_item_the_encoder_cannot_take_is_dead_lettered(
    store: ClientVectorStore,
) -> None:
    consumer, producer = FakeConsumer("item-catalog"), FakeProducer()
    for item_id, title in (("a", "red lipstick"), ("x", "poison pill"), ("b", "dry shampoo")):
        consumer.add_json({"item_id": item_id, "title": title}, key=item_id)
    loop, _ = indexer(consumer, producer, store, PickyEncoder())
    result = loop.poll_once()
    assert (result.indexed, result.dead_letters) == (2, 1)
    assert set(store.get_payloads(["a", "b", "x"])) == {"a", "b"}
    (letter,) = producer.values("dead-letter")
    assert letter["error_type"] == "processing_error" and letter["offset"] == 1
    assert consumer.commits == [3]


# -- the recommender (profile-updates, related-items) -----------------------------------------

TS = "2024-01-01T00:00:00+00:00"


def update(user: str, *items: str) -> dict[str, Any]:
    return {
        "user_id": user,
        "history": [
            {"item_id": i, "weight": 8.0, "last_event_type": "purchase", "last_ts": TS, "count": 1}
            for i in items
        ],
        "last_event_type": "purchase",
        "last_item_id": items[0],
        "trigger_event_ids": [f"{user}-e"],
        "source_ts_ms": 1_700_000_000_000,
        "updated_at": TS,
    }


class RefusingProducer(FakeProducer):
    """Refuses records of `refuse_now` at once, as librdkafka does a record too large."""

    refuse_now: str = "recommendations"

    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None:
        value = kwargs.get("value", b"")
        if topic == self.refuse_now and b"refuse-me" in value:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        super().produce(topic, *args, **kwargs)


def recommender(store: ClientVectorStore, producer: FakeProducer) -> Recommender:
    return Recommender(
        consumer=FakeConsumer("profile-updates"),
        related_consumer=FakeConsumer("related-items"),
        producer=producer,
        encoder=FakeEncoder(),
        store=store,
        metrics=WorkerMetrics.create(CollectorRegistry()),
        topics=RecommenderTopics(
            profile_updates="profile-updates",
            related_items="related-items",
            recommendations="recommendations",
            dead_letter="dead-letter",
        ),
        settings=RecommenderSettings(k=2, candidates=5, max_wait_ms=1, commit_interval_ms=0),
        clock=lambda: 1_700_000_000.0,
    )


@pytest.fixture
def catalog_store(store: ClientVectorStore) -> ClientVectorStore:
    catalog = {"lip1": "red lipstick", "lip2": "pink lipstick", "sh1": "dry shampoo"}
    ids = list(catalog)
    vectors = FakeEncoder().encode([catalog[i] for i in ids])
    store.upsert(ids, vectors, [{"title": catalog[i], "available": True} for i in ids])
    return store


def test_poison_profile_updates_and_refusals_are_dead_lettered_by_the_recommender(
    catalog_store: ClientVectorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = RefusingProducer()
    loop = recommender(catalog_store, producer)
    consumer = loop.consumer
    assert isinstance(consumer, FakeConsumer)
    consumer.add_json(update("u1", "lip1"), key="u1")
    consumer.add(deep_array(), key=b"u2")
    consumer.add(huge(update("u3", "lip1"), "user_id"), key=b"u3")
    consumer.add_json(update("bad", "lip1"), key="bad")
    consumer.add_json(update("refuse-me", "lip1"), key="refuse-me")
    consumer.add_json(update("u4", "sh1"), key="u4")
    real = loop.answer

    def failing(users: Any, **kwargs: Any) -> Any:
        if any(user.update.user_id == "bad" for user in users):
            raise RuntimeError("ranking bug")
        return real(users, **kwargs)

    monkeypatch.setattr(loop, "answer", failing)
    result = loop.poll_once()
    loop.producer.flush()
    assert sorted(r["user_id"] for r in producer.values("recommendations")) == ["u1", "u4"]
    letters = [DeadLetter.model_validate(v) for v in producer.values("dead-letter")]
    assert sorted((x.offset, x.error_type) for x in letters) == [
        (1, "too_deep"),
        (2, "invalid_fields"),  # 990 KB is within ProfileUpdate's limit: an invalid user_id
        (3, "processing_error"),
        (4, "processing_error"),
    ]
    assert result.dead_letters == 4
    assert all(len(x.model_dump_json()) <= DEAD_LETTER_MAX_BYTES for x in letters)


def test_poison_related_items_are_dead_lettered_by_the_recommender(
    catalog_store: ClientVectorStore,
) -> None:
    producer = FakeProducer()
    loop = recommender(catalog_store, producer)
    related = loop.related_consumer
    assert isinstance(related, FakeConsumer)
    related.add(deep_object(), key=b"lip1")
    related.add(b'{"item_id": "lip2", "item_count": NaN, "related": []}', key=b"lip2")
    loop.catch_up_related(timeout_s=1.0)
    assert len(loop.related) == 0
    assert [x["error_type"] for x in producer.values("dead-letter")] == [
        "too_deep",
        "invalid_fields",
    ]


# -- the replay tools -------------------------------------------------------------------------


class ToolProducer:
    """A producer for the replay tools: refuses records over `max_bytes` as librdkafka does."""

    def __init__(self, max_bytes: int = 1_000_000) -> None:
        self.max_bytes = max_bytes
        self.records: list[tuple[str, bytes | None]] = []

    def produce(self, topic: str, *, key: bytes | None, value: bytes | None, **_: Any) -> None:
        if len(value or b"") > self.max_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.records.append((topic, value))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


def test_poison_catalog_lines_are_reported_by_load_catalog() -> None:
    lines = [
        (1, b'{"item_id": "a"}'),
        (2, deep_array()),
        (3, huge({"item_id": "big"}, "description")),
        (4, b'{"item_id": "b", "available": "yes"}'),
        (5, b'{"item_id": "c"}'),
    ]
    report = publish_catalog(lines, producer=ToolProducer(), topic="item-catalog")
    assert (report.published, report.invalid) == (2, 3)
    reasons = dict(report.invalid_lines)
    assert reasons[2].startswith("too_deep") and reasons[3].startswith("too_large")
    assert all(len(reason) < 400 for reason in reasons.values())


def test_poison_lines_the_producer_refuses_are_skipped_by_replay() -> None:
    producer = ToolProducer(max_bytes=100)
    lines = [(1, b'{"user_id": "u1"}'), (2, b"x" * 101), (3, deep_array(600))]
    progress = replay_events(lines, producer=producer, topic="behavior-events", rate=0)
    assert (progress.sent, progress.refused) == (1, 2)


def test_poison_tail_prints_a_deep_record_as_text() -> None:
    record = TailRecord("t", 0, 0, 0, None, deep_array())
    assert isinstance(record.as_json()["value"], str)
