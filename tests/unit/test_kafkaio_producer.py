"""kafkaio.producer: which consumed offsets may be committed, by delivery reports
(`AckedProducer`), and what the asyncio sender's `flush` promises when the broker is away
(`ConfluentSender`): it waits, however long, and never gives up with an error."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from kafkaio.consumer import commit_offsets
from kafkaio.producer import (
    NEVER_TIME_OUT,
    AckedProducer,
    ConfluentSender,
    DeliveryError,
    RecordRefusedError,
    produce,
)
from tests.unit.worker_fakes import FakeMessage, FakeProducer

# Nothing listens on port 1. librdkafka's connection-refused log lines are silenced: its
# threads keep retrying for the rest of the session and would print past pytest's summary.
UNREACHABLE = {"bootstrap.servers": "127.0.0.1:1", "log_level": "0"}


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


def test_a_full_queue_is_polled_until_the_record_fits() -> None:
    class FullOnce(FakeProducer):
        full = 2

        def produce(self, topic: str, *args: Any, **kwargs: Any) -> None:
            if self.full:
                self.full -= 1
                raise BufferError("queue full")
            super().produce(topic, *args, **kwargs)

    producer = FullOnce(hold=True)
    waits: list[float] = []
    poll = producer.poll
    producer.poll = lambda timeout=-1: waits.append(timeout) or poll(timeout)  # type: ignore[method-assign]
    produce(producer, "t", key=b"k", value=b"v")
    assert producer.records == [("t", b"k", b"v")]
    assert waits == [0.05, 0.05]


def test_the_sender_hands_a_batch_over_at_flush_and_raises_on_a_refusal() -> None:
    producer = FakeProducer(refuse_topics={"refused"})
    sender = ConfluentSender(producer, ack_timeout_s=1.0)
    sender.produce("out", key=b"k", value=b"v")
    assert sender.queued == 1 and producer.records == []  # queued until the flush
    asyncio.run(sender.flush())
    assert producer.records == [("out", b"k", b"v")] and sender.queued == 0
    sender.produce("refused", key=None, value=b"x")
    with pytest.raises(DeliveryError, match=r"1 records refused by the broker, first: refused\["):
        asyncio.run(sender.flush())
    asyncio.run(sender.flush())  # a refusal is reported once


def test_flush_waits_out_a_broker_that_does_not_answer_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nothing listens on port 1: the records stay unacknowledged, and flush keeps waiting
    # (never a DeliveryError for a timeout: the inputs are neither acknowledged nor dropped),
    # logging the wait once per ack_timeout_s, until it is cancelled (a stop).
    sender = ConfluentSender.from_config(
        {**UNREACHABLE, "partitioner": "murmur2_random"}, ack_timeout_s=0.3
    )
    sender.produce("t", key=b"k", value=b"v")
    sender.produce("t", key=b"k", value=None, partition=0)
    # Queued until the flush hands the batch to librdkafka (one produce request per batch).
    assert sender.queued == 2
    seen: list[float | None] = []

    async def main() -> None:
        flush = asyncio.create_task(sender.flush())
        await asyncio.sleep(1.6)
        seen.append(sender.waiting_since)
        assert not flush.done()
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush

    with caplog.at_level(logging.WARNING, logger="kafkaio.producer"):
        asyncio.run(main())
    assert sender.queued == 0
    assert seen[0] is not None  # the probes see the wait
    assert sender.waiting_since is None  # cancelled: no longer waiting
    lines = [r.getMessage() for r in caplog.records if "waiting for the broker" in r.getMessage()]
    assert 2 <= len(lines) <= 6, lines  # once per interval, not once per poll
    assert "unacknowledged=2" in lines[0]


def test_the_producers_never_time_a_record_out() -> None:
    sender = ConfluentSender.from_config(UNREACHABLE)
    assert sender.waiting_since is None
    assert NEVER_TIME_OUT == {"message.timeout.ms": 0}


def test_flush_with_nothing_sent_returns() -> None:
    sender = ConfluentSender.from_config(UNREACHABLE, ack_timeout_s=0.5)
    asyncio.run(sender.flush())


def test_flush_leaves_the_event_loop_to_other_tasks_while_it_waits() -> None:
    sender = ConfluentSender.from_config(UNREACHABLE, ack_timeout_s=0.3)
    sender.produce("t", key=b"k", value=b"v")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    async def main() -> None:
        task = asyncio.create_task(ticker())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sender.flush(), 0.5)
        task.cancel()

    asyncio.run(main())
    assert ticks >= 10  # the other agents ran during the 0.5 s wait


def test_acked_flush_waits_until_acknowledged_or_stopped_and_commits_only_acknowledged() -> None:
    broker = ManualBroker()
    broker.flush = lambda timeout=-1: len(broker.reports)  # type: ignore[method-assign]
    acked = AckedProducer(broker, ack_timeout_s=0.1)
    acked.begin(_messages((0, 0)))
    acked.produce("out", key=None, value=b"a")
    acked.end()
    assert acked.flush(timeout=0.2) == 1  # the broker does not answer: nothing committable
    assert acked.waiting_since is not None
    assert acked.take_committable() == {}
    acked.stop.set()
    assert acked.flush() == 1  # stopped: returns at once, still uncommitted
    broker.ack(b"a")
    acked.stop.clear()
    assert acked.flush() == 0
    assert acked.waiting_since is None
    assert acked.take_committable() == {("in", 0): 1}


# -- records the client refuses outright (poison outputs) -------------------------------------


def test_poison_a_record_too_large_for_librdkafka_raises_record_refused_not_kafka_exception() -> (
    None
):
    from confluent_kafka import Producer

    # librdkafka checks message.max.bytes in produce() itself: no broker is needed.
    producer = Producer(UNREACHABLE)
    with pytest.raises(RecordRefusedError, match="1200000 bytes refused") as caught:
        produce(producer, "t", key=None, value=b"x" * 1_200_000)
    assert caught.value.topic == "t" and caught.value.size == 1_200_000


def test_poison_a_fatal_client_error_still_raises_kafka_exception() -> None:
    class Fatal(FakeProducer):
        def produce(self, topic: str, *args: Any, **kwargs: Any) -> None:
            error = KafkaError(KafkaError._FATAL, "fenced", fatal=True)
            raise KafkaException(error)

    with pytest.raises(KafkaException):
        produce(Fatal(), "t", key=None, value=b"v")


def test_poison_a_refused_record_does_not_hold_its_batch_back() -> None:
    producer = FakeProducer(max_bytes=10)
    acked = AckedProducer(producer)
    acked.begin(_messages((0, 0)))
    with pytest.raises(RecordRefusedError):
        acked.produce("out", key=None, value=b"x" * 11)
    acked.produce("out", key=None, value=b"ok")
    acked.end()
    producer.deliver()
    acked.settle()
    assert acked.take_committable() == {("in", 0): 1}


def test_poison_the_sender_refuses_an_oversized_record_when_queued() -> None:
    producer = FakeProducer()
    sender = ConfluentSender(producer, ack_timeout_s=1.0, max_message_bytes=1_000)
    with pytest.raises(RecordRefusedError, match="over the producer's limit"):
        sender.produce("out", key=b"k", value=b"x" * 1_000)
    sender.produce("out", key=b"k", value=b"v")
    assert sender.queued == 1
    asyncio.run(sender.flush())
    assert producer.records == [("out", b"k", b"v")]


def test_poison_a_refusal_at_hand_over_is_reported_by_flush() -> None:
    producer = FakeProducer(max_bytes=5)
    sender = ConfluentSender(producer, ack_timeout_s=1.0)
    sender.produce("out", key=None, value=b"x" * 6)  # passes the sender's own, larger limit
    with pytest.raises(DeliveryError, match="1 records refused"):
        asyncio.run(sender.flush())
