"""Producing with acknowledgement: one `DeliveryError`, one BufferError retry policy, and
delivery-report tracking, used two ways.

- `AckedProducer` (the workers' loops): records count toward the consumed batch they answer;
  a batch's input offsets become committable once it and every earlier batch are acknowledged,
  so a loop goes on with its next batch while the broker acknowledges this one.
- `ConfluentSender` (the stream processor's agents, on an event loop): records are queued per
  batch, handed to librdkafka together, and `await flush()` returns once all are acknowledged.

Either way a record the broker refused (after librdkafka's retries) raises `DeliveryError`
before the inputs it answers are committed: delivery stays at least once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .client import Message, Partition, Producer

# How long a producer whose queue is full is polled before the record is offered again.
BUFFER_FULL_POLL_S = 0.05
# A loop that outruns the broker by this many batches waits for the oldest's acknowledgement.
MAX_UNACKED_BATCHES = 256
# How often `ConfluentSender.flush` checks for acknowledgements.
FLUSH_POLL_S = 0.0005

DeliveryReport = Callable[[Any, Any], None]


class KafkaIOError(RuntimeError):
    """Root of this package's errors."""


class DeliveryError(KafkaIOError):
    """Records were not acknowledged by the broker; the inputs they answer are not committed,
    so they will be redone."""


def produce(
    producer: Producer,
    topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    partition: int | None = None,
    on_delivery: DeliveryReport | None = None,
) -> None:
    """Produce one record, waiting for queue space instead of failing when librdkafka's queue
    is full (back-pressure); `partition` None: by the key; `on_delivery(error, message)` is its
    delivery report."""
    extra: dict[str, Any] = {}
    if partition is not None:
        extra["partition"] = partition
    if on_delivery is not None:
        extra["on_delivery"] = on_delivery
    while True:
        try:
            producer.produce(topic, key=key, value=value, **extra)
            return
        except BufferError:  # librdkafka's queue is full: let it drain
            producer.poll(BUFFER_FULL_POLL_S)


def not_acknowledged(remaining: int, timeout_s: float) -> DeliveryError:
    """The error of records still unacknowledged when a flush gave up."""
    return DeliveryError(
        f"{remaining} records not acknowledged within {timeout_s:.0f} s; is the broker reachable?"
    )


def flush(producer: Producer, *, timeout_s: float = 30.0) -> None:
    """Wait until every produced record is acknowledged; raise when some are not."""
    remaining = producer.flush(timeout_s)
    if remaining:
        raise not_acknowledged(remaining, timeout_s)


@dataclass(slots=True)
class Deliveries:
    """The delivery reports of a set of records: how many are outstanding, which were refused."""

    outstanding: int = 0
    refused: int = 0
    first_refusal: str | None = None

    def expect(self) -> DeliveryReport:
        """Count one more record; its delivery report is the returned callback."""
        self.outstanding += 1
        return self.delivered

    def delivered(self, error: Any, message: Any) -> None:
        self.outstanding -= 1
        if error is not None:
            self.refused += 1
            if self.first_refusal is None:
                self.first_refusal = f"{message.topic()}[{message.partition()}]: {error}"

    def raise_refused(self, consequence: str) -> None:
        """Raise `DeliveryError` (and forget the refusals) when a record was refused."""
        if not self.refused:
            return
        msg = (
            f"{self.refused} records refused by the broker, first: {self.first_refusal}; "
            f"{consequence}"
        )
        self.refused, self.first_refusal = 0, None
        raise DeliveryError(msg)


@dataclass(slots=True)
class _Batch:
    """The input offsets of one consumed batch and the delivery reports of its records."""

    offsets: dict[Partition, int]  # next offset to commit, per (topic, partition)
    open: bool
    deliveries: Deliveries = field(default_factory=Deliveries)


class AckedProducer:
    """A producer that tells which consumed offsets may be committed, without a round trip
    per batch.

    `begin(messages)` opens the batch of a consume() result; every record produced until
    `end()` counts toward it, through librdkafka's delivery reports. A batch's offsets become
    committable (`take_committable`) once it and every batch before it had all their records
    acknowledged, so a loop can go on to its next batch while the broker acknowledges this one
    and still commit at least once. A record the broker refused (after librdkafka's retries)
    raises `DeliveryError` from `settle`: neither its batch nor any later one is committed, so
    they are redone after the restart. Records produced outside a batch (a dead letter of an
    uncommitted input) are checked the same way. `flush` waits for everything.
    """

    def __init__(self, producer: Producer, *, max_unacked: int = MAX_UNACKED_BATCHES) -> None:
        self.producer = producer
        self.max_unacked = max_unacked
        self._batches: deque[_Batch] = deque()
        self._committable: dict[Partition, int] = {}

    def begin(self, messages: Sequence[Message]) -> None:
        """Open the batch of `messages` (closing the one before, if still open)."""
        while len(self._batches) >= self.max_unacked:  # back-pressure: the broker is behind
            self.producer.poll(BUFFER_FULL_POLL_S)
            self.settle()
        self.end()
        offsets: dict[Partition, int] = {}
        for msg in messages:
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            if topic is None or partition is None or offset is None or offset < 0:
                continue
            key = (topic, partition)
            offsets[key] = max(offsets.get(key, 0), offset + 1)
        self._batches.append(_Batch(offsets, open=True))

    def end(self) -> None:
        """Close the open batch: it settles once its records are acknowledged."""
        if self._batches:
            self._batches[-1].open = False

    def produce(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        on_acked: Callable[[], None] | None = None,
    ) -> None:
        """Produce one record for the open batch (or a batch of its own outside one);
        `on_acked` runs when the broker acknowledged it (from `settle`/`flush`)."""
        batch = self._batches[-1] if self._batches else None
        if batch is None or (not batch.open and batch.offsets):  # no batch open: one of its own
            batch = _Batch({}, open=False)
            self._batches.append(batch)
        report = batch.deliveries.expect()
        if on_acked is None:
            callback = report
        else:

            def callback(error: Any, message: Any) -> None:
                report(error, message)
                if error is None:
                    on_acked()

        produce(self.producer, topic, key=key, value=value, on_delivery=callback)

    def settle(self) -> None:
        """Serve delivery reports; move the offsets of acknowledged batches to committable."""
        self.producer.poll(0)
        batches = self._batches
        while batches and not batches[0].open and batches[0].deliveries.outstanding <= 0:
            batch = batches.popleft()
            if batch.deliveries.refused:
                batches.clear()
                batch.deliveries.raise_refused(
                    "the offsets of its batch and of later ones are not committed and will be "
                    "redone"
                )
            self._committable.update(batch.offsets)

    def poll(self, timeout: float = -1) -> int:
        return self.producer.poll(timeout)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait until every record is acknowledged; raise when some are not, or were refused."""
        self.end()
        flush(self.producer, timeout_s=timeout)
        self.settle()
        return 0

    @property
    def unacked_batches(self) -> int:
        return len(self._batches)

    def take_committable(self) -> dict[Partition, int]:
        """The next offsets to commit per partition, acknowledged since the last call."""
        out, self._committable = self._committable, {}
        return out


def batch_producer(config: dict[str, Any]) -> Producer:
    """A librdkafka producer for `ConfluentSender`: idempotent, and a linger that covers the
    hand-over of one batch's records in `flush` (a tight loop of C calls), so they leave
    together; the agents flush per batch anyway."""
    from confluent_kafka import Producer as ConfluentProducer

    producer: Producer = ConfluentProducer({**config, "enable.idempotence": True, "linger.ms": 1})
    return producer


class ConfluentSender:
    """Output records of an asyncio program through librdkafka (confluent-kafka).

    Faust's send path costs the event loop a large share of a millisecond per record, where
    librdkafka's `produce` is a C call of microseconds that batches on its own threads.
    `produce` only queues a record here; `flush` hands the batch's records to librdkafka in one
    go (so they travel in one produce request, not a few per batch) and waits (the event loop
    keeps running) until the broker acknowledged everything. The agents flush before
    their input offsets are acknowledged, so delivery stays at least once. A record the broker
    refused after librdkafka's retries raises `DeliveryError` from `flush`, which stops the
    agent rather than commit past an output that was lost.
    """

    def __init__(self, producer: Producer, *, flush_timeout_s: float = 30.0) -> None:
        self._producer = producer
        self._flush_timeout_s = flush_timeout_s
        self._deliveries = Deliveries()
        self._queued: list[tuple[str, bytes | None, bytes | None, int | None]] = []

    @classmethod
    def from_config(
        cls, config: dict[str, Any], *, flush_timeout_s: float = 30.0
    ) -> ConfluentSender:
        """A sender over a new `batch_producer(config)`."""
        return cls(batch_producer(config), flush_timeout_s=flush_timeout_s)

    def produce(
        self, topic: str, *, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None:
        """Queue one record for the next `flush` (`partition` None: librdkafka's partitioner
        on the key)."""
        self._queued.append((topic, key, value, partition))

    @property
    def queued(self) -> int:
        """Records produced since the last `flush` (not yet handed to librdkafka)."""
        return len(self._queued)

    def _hand_over(self) -> None:
        queued, self._queued = self._queued, []
        producer, deliveries = self._producer, self._deliveries
        for topic, key, value, partition in queued:
            produce(
                producer,
                topic,
                key=key,
                value=value,
                partition=partition,
                on_delivery=deliveries.expect(),
            )

    async def flush(self) -> None:
        """Send every queued record and wait until all are acknowledged; raise if one was
        refused."""
        self._hand_over()
        # Polled on the event loop: `poll(0)` serves the delivery reports. librdkafka's
        # blocking `flush` in a thread costs about twice the broker round trip (it re-checks
        # every 10 ms, and every hand-over between threads waits for the GIL).
        deadline = time.monotonic() + self._flush_timeout_s
        self._producer.poll(0)
        while (remaining := self._deliveries.outstanding) and time.monotonic() < deadline:
            await asyncio.sleep(FLUSH_POLL_S)
            self._producer.poll(0)
        if remaining:
            raise not_acknowledged(remaining, self._flush_timeout_s)
        self._deliveries.raise_refused("the inputs they answer are not acknowledged")
