"""AckedProducer: which consumed offsets may be committed, by delivery reports."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.worker_fakes import FakeMessage
from workers.kafka_io import AckedProducer, DeliveryError, commit_offsets


class ManualBroker:
    """A producer whose delivery reports are served one by one, when the test says."""

    def __init__(self) -> None:
        self.reports: list[tuple[Any, str, bytes | None]] = []
        self.waits: list[float] = []

    def produce(
        self, topic: str, *, key: bytes | None, value: bytes | None, on_delivery: Any
    ) -> None:
        self.reports.append((on_delivery, topic, value))

    def ack(self, value: bytes, error: str | None = None) -> None:
        n = next(i for i, (_, _, v) in enumerate(self.reports) if v == value)
        callback, topic, _ = self.reports.pop(n)
        callback(error, FakeMessage(topic, value))

    def poll(self, timeout: float = -1) -> int:
        self.waits.append(timeout)
        return 0

    def flush(self, timeout: float = -1) -> int:
        while self.reports:
            self.ack(self.reports[0][2])  # type: ignore[arg-type]
        return 0


def _messages(*positions: tuple[int, int]) -> list[FakeMessage]:
    return [FakeMessage("in", b"x", None, partition, offset) for partition, offset in positions]


def test_a_batch_commits_only_after_it_and_every_earlier_batch_are_acknowledged() -> None:
    broker = ManualBroker()
    acked = AckedProducer(broker)
    acked.begin(_messages((0, 0), (0, 1), (1, 7)))
    acked.produce("out", key=None, value=b"a1")
    acked.produce("out", key=None, value=b"a2")
    acked.begin(_messages((0, 2)))  # closes the first batch
    acked.produce("out", key=None, value=b"b1")
    acked.end()
    broker.ack(b"b1")  # the later batch first: nothing may be committed yet
    broker.ack(b"a1")
    acked.settle()
    assert acked.take_committable() == {}
    broker.ack(b"a2")
    acked.settle()
    # Both batches: the next offset of each partition, the later batch's where it has one.
    assert acked.take_committable() == {("in", 0): 3, ("in", 1): 8}
    assert acked.take_committable() == {}
    assert acked.unacked_batches == 0


def test_an_open_batch_never_settles_and_an_empty_one_settles_when_closed() -> None:
    broker = ManualBroker()
    acked = AckedProducer(broker)
    acked.begin(_messages((0, 4)))
    acked.settle()
    assert acked.take_committable() == {}  # still open: more records may come
    acked.end()
    acked.settle()
    assert acked.take_committable() == {("in", 0): 5}


def test_on_acked_runs_for_acknowledged_records_only() -> None:
    broker = ManualBroker()
    acked = AckedProducer(broker)
    seen: list[str] = []
    acked.begin(_messages((0, 0)))
    acked.produce("out", key=None, value=b"ok", on_acked=lambda: seen.append("ok"))
    acked.produce("out", key=None, value=b"no", on_acked=lambda: seen.append("no"))
    acked.end()
    broker.ack(b"ok")
    broker.ack(b"no", error="MSG_SIZE_TOO_LARGE")
    assert seen == ["ok"]
    with pytest.raises(DeliveryError, match="MSG_SIZE_TOO_LARGE"):
        acked.settle()
    assert acked.take_committable() == {}


def test_a_refusal_blocks_later_batches_and_records_outside_a_batch_are_checked() -> None:
    broker = ManualBroker()
    acked = AckedProducer(broker)
    acked.produce("dead-letter", key=None, value=b"loose")  # before any batch
    acked.begin(_messages((0, 0)))
    acked.produce("out", key=None, value=b"a")
    acked.end()
    broker.ack(b"a")
    acked.settle()
    assert acked.take_committable() == {}  # waits for the loose record before it
    broker.ack(b"loose", error="TOPIC_AUTHORIZATION_FAILED")
    with pytest.raises(DeliveryError, match="TOPIC_AUTHORIZATION_FAILED"):
        acked.settle()
    assert acked.take_committable() == {}


def test_flush_waits_for_everything_and_back_pressure_bounds_the_unacknowledged() -> None:
    broker = ManualBroker()
    acked = AckedProducer(broker, max_unacked=2)
    acked.begin(_messages((0, 0)))
    acked.produce("out", key=None, value=b"a")
    acked.begin(_messages((0, 1)))
    acked.produce("out", key=None, value=b"b")
    acked.end()
    # A third batch must wait for the oldest: the fake broker acknowledges when polled long.
    original_poll = broker.poll

    def poll(timeout: float = -1) -> int:
        if timeout > 0 and broker.reports:
            broker.ack(broker.reports[0][2])  # type: ignore[arg-type]
        return original_poll(timeout)

    broker.poll = poll  # type: ignore[method-assign]
    acked.begin(_messages((0, 2)))
    assert acked.unacked_batches == 2  # the oldest settled, the third opened
    assert 0.05 in broker.waits
    acked.produce("out", key=None, value=b"c")
    assert acked.flush() == 0
    assert acked.unacked_batches == 0
    assert acked.take_committable() == {("in", 0): 3}


class AssignedConsumer:
    def __init__(self, *partitions: int) -> None:
        self.partitions = partitions
        self.committed: list[list[tuple[str, int, int]]] = []

    def assignment(self) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition("in", p) for p in self.partitions]

    def commit(self, *, offsets: list[Any], asynchronous: bool) -> None:
        assert asynchronous
        self.committed.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])


def test_offsets_of_partitions_taken_away_by_a_rebalance_are_not_committed() -> None:
    consumer = AssignedConsumer(1)
    commit_offsets(consumer, {("in", 0): 5, ("in", 1): 9})  # type: ignore[arg-type]
    assert consumer.committed == [[("in", 1, 9)]]
    commit_offsets(consumer, {("in", 0): 6})  # type: ignore[arg-type]
    assert consumer.committed == [[("in", 1, 9)]]  # nothing left to commit: no call
