"""The slice of the Kafka client API the workers use, and helpers shared by both loops.

The loops receive consumers and producers built by the composition root (confluent-kafka in
production, fakes in unit tests); these Protocols name what they need.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from schemas.decoding import Rejection, dead_letter

logger = logging.getLogger(__name__)


class Message(Protocol):
    def error(self) -> Any: ...
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def timestamp(self) -> tuple[int, int]: ...


class Consumer(Protocol):
    def consume(self, num_messages: int = 1, timeout: float = -1) -> Sequence[Message]: ...
    def commit(self, *args: Any, **kwargs: Any) -> Any: ...
    def close(self) -> None: ...


class Producer(Protocol):
    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None: ...
    def poll(self, timeout: float = -1) -> int: ...
    def flush(self, timeout: float = -1) -> int: ...


class DeliveryError(RuntimeError):
    """Records could not be delivered; offsets are not committed, so they will be redone."""


def produce(
    producer: Producer,
    topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    on_delivery: Callable[[Any, Any], None] | None = None,
) -> None:
    """Produce one record, waiting for queue space instead of failing when the queue is full;
    `on_delivery(error, message)` is its delivery report."""
    extra = {} if on_delivery is None else {"on_delivery": on_delivery}
    while True:
        try:
            producer.produce(topic, key=key, value=value, **extra)
            return
        except BufferError:  # librdkafka's queue is full: let it drain
            producer.poll(0.05)


def flush(producer: Producer, *, timeout_s: float = 30.0) -> None:
    """Wait until every produced record is acknowledged; raise when some are not."""
    remaining = producer.flush(timeout_s)
    if remaining:
        raise DeliveryError(f"{remaining} records still undelivered after {timeout_s:.0f} s")


# A loop that outruns the broker by this many batches waits for the oldest's acknowledgement.
MAX_UNACKED_BATCHES = 256

Partition = tuple[str, int]


@dataclass(slots=True)
class _Batch:
    """The input offsets of one consumed batch and its records not yet acknowledged."""

    offsets: dict[Partition, int]  # next offset to commit, per (topic, partition)
    open: bool
    outstanding: int = 0
    error: str | None = None

    def delivered(self, error: Any, message: Any) -> None:
        self.outstanding -= 1
        if error is not None and self.error is None:
            self.error = f"{message.topic()}[{message.partition()}]: {error}"


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
            self.producer.poll(0.05)
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
        if on_acked is None:
            callback: Callable[[Any, Any], None] = batch.delivered
        else:

            def callback(error: Any, message: Any) -> None:
                batch.delivered(error, message)
                if error is None:
                    on_acked()

        batch.outstanding += 1
        produce(self.producer, topic, key=key, value=value, on_delivery=callback)

    def settle(self) -> None:
        """Serve delivery reports; move the offsets of acknowledged batches to committable."""
        self.producer.poll(0)
        batches = self._batches
        while batches and not batches[0].open and batches[0].outstanding <= 0:
            batch = batches.popleft()
            if batch.error is not None:
                batches.clear()
                raise DeliveryError(
                    f"a record was refused by the broker: {batch.error}; the offsets of its "
                    "batch and of later ones are not committed and will be redone"
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


def send_dead_letter(
    producer: Producer,
    *,
    topic: str,
    message: Message,
    rejection: Rejection,
    stage: str,
    counter: Counter,
) -> None:
    """Publish a rejected input, verbatim with the reason, to the dead-letter `topic`."""
    partition, offset = message.partition(), message.offset()
    record = dead_letter(
        rejection,
        raw=message.value(),
        key=message.key(),
        topic=message.topic() or "",
        partition=-1 if partition is None else partition,
        offset=-1 if offset is None else offset,
        stage=stage,
    )
    logger.warning(
        "dead letter %s[%s] offset=%s stage=%s error_type=%s reason=%s",
        record.source_topic,
        record.partition,
        record.offset,
        stage,
        rejection.error_type,
        rejection.reason,
    )
    produce(producer, topic, key=message.key(), value=record.model_dump_json().encode())
    counter.labels(stage=stage, error_type=rejection.error_type).inc()


class DeadLetters:
    """One stage's dead-letter route: producer, topic, stage and counter bound once."""

    def __init__(self, producer: Producer, *, topic: str, stage: str, counter: Counter) -> None:
        self.producer = producer
        self.topic = topic
        self.stage = stage
        self.counter = counter

    def send(self, message: Message, rejection: Rejection) -> None:
        """Publish `message`, rejected for `rejection`, to the dead-letter topic."""
        send_dead_letter(
            self.producer,
            topic=self.topic,
            message=message,
            rejection=rejection,
            stage=self.stage,
            counter=self.counter,
        )


def commit_offsets(consumer: Consumer, offsets: Mapping[Partition, int]) -> None:
    """Commit these next offsets without waiting for the broker's answer (their outputs were
    acknowledged first, so a lost commit only redoes records). Offsets of partitions a
    rebalance took away are dropped: their new owner commits its own."""
    assignment = getattr(consumer, "assignment", None)
    if offsets and assignment is not None:
        assigned = {(tp.topic, tp.partition) for tp in assignment()}
        offsets = {key: offset for key, offset in offsets.items() if key in assigned}
    if not offsets:
        return
    from confluent_kafka import TopicPartition

    consumer.commit(
        offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=True
    )


def commit(consumer: Consumer) -> None:
    """Commit the consumed positions without waiting for the broker's answer (the outputs
    were flushed first, so a lost commit only redoes records); nothing consumed is fine."""
    try:
        consumer.commit(asynchronous=True)
    except Exception as exc:
        if "_NO_OFFSET" in str(exc) or "NO_OFFSET" in str(exc):
            return
        raise


def usable(messages: Sequence[Message]) -> list[Message]:
    """Drop client-side events (partition EOF, transient errors) from a consume() result."""
    out: list[Message] = []
    for msg in messages:
        err = msg.error()
        if err is None:
            out.append(msg)
        elif not _is_eof(err):
            logger.warning("consumer error topic=%s error=%s", msg.topic(), err)
    return out


def _is_eof(err: Any) -> bool:
    try:
        from confluent_kafka import KafkaError

        return bool(err.code() == KafkaError._PARTITION_EOF)
    except Exception:  # a fake error in unit tests
        return False


class LagReporter:
    """Sets `relata_consumer_lag_records{topic}` from the client's cached watermarks, at most
    every `interval_s` (lag is a trend; querying the broker per batch would cost latency)."""

    def __init__(self, consumer: Any, gauge: Gauge, *, interval_s: float = 5.0) -> None:
        self._consumer = consumer
        self._gauge = gauge
        self._interval_s = interval_s
        self._next = 0.0

    def maybe_report(self) -> None:
        now = time.monotonic()
        if now < self._next or not hasattr(self._consumer, "assignment"):
            return
        self._next = now + self._interval_s
        try:
            lag: dict[str, int] = {}
            partitions = self._consumer.assignment()
            if not partitions:
                return
            for tp in self._consumer.position(partitions):
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if high is None or high < 0 or tp.offset is None or tp.offset < 0:
                    continue
                lag[tp.topic] = lag.get(tp.topic, 0) + max(0, high - tp.offset)
            for topic, value in lag.items():
                self._gauge.labels(topic=topic).set(value)
        except Exception as exc:  # lag is advisory; never stop the loop for it
            logger.debug("lag report failed error=%s", exc)
