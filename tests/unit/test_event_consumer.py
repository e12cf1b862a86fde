"""The profile agent's batch consumer and table (streams/event_consumer.py) against a fake
librdkafka consumer: restore on assignment, offsets stored only after a handled batch, commit
and drop on close, failures surfaced. The real broker path is in
tests/integration/test_streams_app.py (restart and restore)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from prometheus_client import CollectorRegistry, Gauge

from streams.event_consumer import (
    EventBatchConsumer,
    PartitionNotAssignedError,
    ProfileStore,
    changelog_key,
)
from tests.unit.worker_fakes import FakeMessage

TOPIC = "behavior-events"
CHANGELOG = "app-profiles-changelog"


def message(  # a confluent-kafka message, as the worker fakes build it
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
) -> Any:
    return FakeMessage(topic, value, key, partition, offset)


@dataclass
class GroupConsumer:
    """Assigns `assign` on the first consume, then hands out `batches` one per call."""

    assign: list[int]
    batches: list[list[Any]]
    callbacks: dict[str, Any] = field(default_factory=dict)
    stored: list[tuple[int, int]] = field(default_factory=list)
    commits: int = 0
    closed: bool = False

    def subscribe(self, topics: Sequence[str], **callbacks: Any) -> None:
        assert list(topics) == [TOPIC]
        self.callbacks = callbacks

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        if self.assign:
            partitions, self.assign = self.assign, []
            self.callbacks["on_assign"](self, [TopicPartition(TOPIC, p) for p in partitions])
        return self.batches.pop(0)[:num_messages] if self.batches else []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)]

    def position(self, partitions: Sequence[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, tp.partition, 7) for tp in partitions]

    def get_watermark_offsets(self, tp: TopicPartition, *, cached: bool) -> tuple[int, int]:
        assert cached  # never a broker round trip per batch
        return 0, 10

    def store_offsets(self, *, offsets: Sequence[TopicPartition]) -> None:
        self.stored.extend((tp.partition, tp.offset) for tp in offsets)

    def commit(self, *, asynchronous: bool) -> None:
        assert asynchronous is False
        self.commits += 1

    def close(self) -> None:
        self.callbacks["on_revoke"](self, [])
        self.closed = True


@dataclass
class ChangelogReader:
    """Serves changelog records by partition, as an assign()-ed consumer would."""

    records: dict[int, list[tuple[bytes | None, bytes | None]]]
    fail: bool = False
    queue: list[Any] = field(default_factory=list)

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        if self.fail:
            raise RuntimeError("changelog unreadable")
        return 0, len(self.records.get(tp.partition, []))

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        (tp,) = partitions
        self.queue = [
            message(tp.topic, tp.partition, offset, key, value)
            for offset, (key, value) in enumerate(self.records[tp.partition])
        ]

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        batch, self.queue = self.queue[:num_messages], self.queue[num_messages:]
        return batch

    def unassign(self) -> None:
        self.queue = []

    def close(self) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int | None]] = []

    def produce(
        self, topic: str, *, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None:
        self.sent.append((topic, key, value, partition))


def build(
    group: GroupConsumer,
    reader: ChangelogReader,
    handle: Any,
    *,
    store: ProfileStore | None = None,
    lags: Gauge | None = None,
    restored: list[int] | None = None,
) -> tuple[EventBatchConsumer, ProfileStore]:
    store = store or ProfileStore(changelog_topic=CHANGELOG, changelog=Sink())

    def client(config: dict[str, Any]) -> Any:
        return group if config.get("role") == "group" else reader

    consumer = EventBatchConsumer(
        consumer_config={"role": "group"},
        restore_config={"role": "restore"},
        topic=TOPIC,
        store=store,
        handle=handle,
        to_record=lambda message: message,
        batch_max=100,
        window_s=0.001,
        client=client,
        lag_gauge=lags,
        on_restored=None if restored is None else restored.append,
    )
    return consumer, store


def test_assigned_partitions_are_restored_before_their_events_and_offsets_follow_handling() -> None:
    group = GroupConsumer(
        assign=[0, 1],
        batches=[
            [
                message(TOPIC, 0, 5, b"u1", b"e1"),
                message(TOPIC, 1, 7, b"u3", b"e2"),
                message(TOPIC, 0, 6, b"u1", b"e3"),
            ],
            [message(TOPIC, 1, 8, b"u3", b"e4")],
        ],
    )
    reader = ChangelogReader(
        {
            0: [
                (changelog_key("u1"), b"p1"),
                (changelog_key("u2"), b"p2"),
                (changelog_key("u2"), None),  # a tombstone deletes u2
            ]
        }
    )
    seen: list[tuple[list[bytes | None], list[tuple[int, int]]]] = []

    async def handle(records: list[Any]) -> None:
        # The partitions' profiles are there before the first event is handled.
        assert store.get(0, "u1") == b"p1" and store.get(0, "u2") is None
        seen.append(([r.value() for r in records], list(group.stored)))
        if len(seen) == 2:
            consumer.stop()

    registry = CollectorRegistry()
    lags = Gauge("lag_records", "lag", ["topic"], registry=registry)
    restored: list[int] = []
    consumer, store = build(group, reader, handle, lags=lags, restored=restored)
    asyncio.run(consumer.run())
    # Offsets of a batch are stored only after its handler returned (none before the first).
    assert seen == [([b"e1", b"e2", b"e3"], []), ([b"e4"], [(0, 7), (1, 8)])]
    assert group.stored == [(0, 7), (1, 8), (1, 9)]
    assert restored == [3]  # one assignment, three changelog records replayed
    # Lag from the cached watermarks (10) and positions (7) of both partitions, reported once
    # within LAG_REPORT_S.
    assert registry.get_sample_value("lag_records", {"topic": TOPIC}) == 6
    # Closing commits what was stored, leaves the group and drops the partitions.
    assert group.closed and group.commits >= 1
    assert store.partitions == set()


def test_a_failed_batch_stores_no_offsets_and_the_consumer_still_closes() -> None:
    group = GroupConsumer(assign=[0], batches=[[message(TOPIC, 0, 0, b"u1", b"e1")]])

    async def handle(records: list[Any]) -> None:
        raise RuntimeError("broker refused the outputs")

    consumer, _ = build(group, ChangelogReader({}), handle)
    with pytest.raises(RuntimeError, match="refused"):
        asyncio.run(consumer.run())
    assert group.stored == [] and group.closed


def test_a_failed_restore_stops_the_consumer_with_its_error() -> None:
    group = GroupConsumer(assign=[0], batches=[[message(TOPIC, 0, 0, b"u1", b"e1")]])
    handled: list[Any] = []

    async def handle(records: list[Any]) -> None:
        handled.append(records)

    consumer, _ = build(group, ChangelogReader({0: [(b'"u1"', b"p")]}, fail=True), handle)
    with pytest.raises(RuntimeError, match="changelog unreadable"):
        asyncio.run(consumer.run())
    assert handled == [] and group.stored == [] and group.closed


@pytest.mark.parametrize("rocksdb", [False, True])
def test_store_writes_its_changelog_and_refuses_partitions_it_does_not_own(
    tmp_path: Path, rocksdb: bool
) -> None:
    sink = Sink()
    store = ProfileStore(
        changelog_topic=CHANGELOG, changelog=sink, directory=tmp_path if rocksdb else None
    )
    store.open(2)
    store.put(2, "u1", b'{"user_id":"u1"}')
    assert store.get(2, "u1") == b'{"user_id":"u1"}'
    assert list(store.keys()) == ["u1"] and len(store) == 1
    # Same topic, partition and key encoding (JSON) as Faust's changelog of this table.
    assert sink.sent == [(CHANGELOG, b'"u1"', b'{"user_id":"u1"}', 2)]
    with pytest.raises(PartitionNotAssignedError, match="partition 3"):
        store.get(3, "u1")
    # Reopening starts empty (a restore rebuilds it), also on RocksDB.
    store.open(2)
    assert store.get(2, "u1") is None
    store.restore(2, [(b'"u1"', b"v1"), (None, b"ignored")])
    assert store.get(2, "u1") == b"v1"
    store.close_all()
    assert store.partitions == set()


# -- broker outages: partitions lost while a batch waits, a replay the broker interrupts -----


@dataclass
class LosingConsumer(GroupConsumer):
    """A group consumer whose assignment follows the callbacks it runs (a lost partition is
    gone from `assignment()`, as in librdkafka)."""

    held: set[int] = field(default_factory=set)
    reassign: list[int] = field(default_factory=list)

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        if self.assign:
            self.held |= set(self.assign)
        if self.reassign and not self.batches:
            partitions, self.reassign = self.reassign, []
            self.held |= set(partitions)
            self.callbacks["on_assign"](self, [TopicPartition(TOPIC, p) for p in partitions])
        return super().consume(num_messages, timeout)

    def lose(self, partition: int) -> None:
        self.held.discard(partition)
        self.callbacks["on_lost"](self, [TopicPartition(TOPIC, partition)])

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, p) for p in sorted(self.held)]


def test_a_partition_lost_while_its_batch_waits_is_not_stored_and_is_regained() -> None:
    group = LosingConsumer(
        assign=[0, 1],
        batches=[[message(TOPIC, 0, 5, b"u1", b"e1"), message(TOPIC, 1, 7, b"u3", b"e2")]],
        reassign=[1],
    )
    reader = ChangelogReader({0: [(changelog_key("u1"), b"p1")], 1: [(changelog_key("u3"), b"p3")]})
    watch_states: list[bool] = []

    async def handle(records: list[Any]) -> None:
        # The broker went away while the outputs waited; the session timed out meanwhile.
        group.lose(1)
        watch_states.append(consumer.watch.lost_since is not None)

    consumer, store = build(group, reader, handle)

    async def run() -> None:
        task = asyncio.create_task(consumer.run())
        while not (
            group.stored and consumer.watch.lost_since is None and store.partitions == {0, 1}
        ):
            await asyncio.sleep(0.01)
        consumer.stop()
        await task

    asyncio.run(asyncio.wait_for(run(), 10))
    assert watch_states == [True]  # the probes saw the partitions lost
    # Only the partition still held got its offset stored: partition 1's event is redone by
    # whoever owns it now (here: this consumer again, after replaying its changelog).
    assert group.stored == [(0, 6)]
    assert consumer.watch.lost_since is None and consumer.watch.failure is None


def test_a_changelog_replay_the_broker_interrupts_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from confluent_kafka import KafkaError, KafkaException

    import streams.event_consumer as event_consumer

    monkeypatch.setattr(event_consumer, "RESTORE_RETRY_S", 0.01)
    failures = [KafkaException(KafkaError(KafkaError._TRANSPORT))] * 2

    class FlakyReader(ChangelogReader):
        def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
            if failures:
                raise failures.pop()
            return super().get_watermark_offsets(tp, timeout)

    group = GroupConsumer(assign=[0], batches=[[message(TOPIC, 0, 0, b"u1", b"e1")]])
    profiles: list[bytes | None] = []

    async def handle(records: list[Any]) -> None:
        profiles.append(store.get(0, "u1"))
        consumer.stop()

    consumer, store = build(group, FlakyReader({0: [(changelog_key("u1"), b"p1")]}), handle)
    asyncio.run(consumer.run())
    assert failures == [] and profiles == [b"p1"]
    assert consumer.watch.failure is None


def test_a_handler_that_fails_marks_the_loop_failed_for_the_probes() -> None:
    group = GroupConsumer(assign=[0], batches=[[message(TOPIC, 0, 0, b"u1", b"e1")]])

    async def handle(records: list[Any]) -> None:
        raise RuntimeError("broker refused the outputs")

    consumer, _ = build(group, ChangelogReader({}), handle)
    with pytest.raises(RuntimeError):
        asyncio.run(consumer.run())
    assert consumer.watch.failure is not None and "refused" in consumer.watch.failure
