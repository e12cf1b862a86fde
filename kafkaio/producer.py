"""Producing with acknowledgement: one `DeliveryError`, one BufferError retry policy, and
delivery-report tracking, used two ways.

- `AckedProducer` (the workers' loops): records count toward the consumed batch they answer;
  a batch's input offsets become committable once it and every earlier batch are acknowledged,
  so a loop goes on with its next batch while the broker acknowledges this one.
- `ConfluentSender` (the stream processor's agents, on an event loop): records are queued per
  batch, handed to librdkafka together, and `await flush()` returns once all are acknowledged.

Either way a record the broker refused (after librdkafka's retries) raises `DeliveryError`
before the inputs it answers are committed: delivery stays at least once.

A broker that does not answer is waited out, however long it is away: producers never give up
on a record (`message.timeout.ms=0`, `NEVER_TIME_OUT`), and a wait for acknowledgements goes
on, polling with backoff and logging once every `ack_timeout_s`, until they come (or the
caller stops). An unacknowledged output is never dropped and never committed past.

A record the client refuses synchronously, before anything is queued (librdkafka's `produce`
raising `KafkaException`, e.g. MSG_SIZE_TOO_LARGE: key and value over `message.max.bytes`),
raises `RecordRefusedError` from `produce`, here, in one place: the stage then dead-letters
the input that output answers (`processing_error`) and goes on, rather than crash on every
restart at the same record. `ConfluentSender` queues records until its flush, so it checks
the size when a record is queued, where the caller still knows the input. A dead letter is
never refused: its size is bounded by construction (`schemas.decoding.dead_letter`). A fatal
client error is not a record's fault and still raises `KafkaException`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from .client import Message, Partition, Producer

logger = logging.getLogger(__name__)

# Record headers: (name, value) pairs.
Headers = Sequence[tuple[str, bytes]]
# How long a producer whose queue is full is polled before the record is offered again.
BUFFER_FULL_POLL_S = 0.05
# A loop that outruns the broker by this many batches waits for the oldest's acknowledgement.
MAX_UNACKED_BATCHES = 256
# How often `ConfluentSender.flush` checks for acknowledgements at first...
FLUSH_POLL_S = 0.0005
# ...and, backing off while the broker does not answer, at least this often.
FLUSH_POLL_MAX_S = 0.1
# A wait for acknowledgements this long is an outage: it is logged (once per this interval)
# and the process reports itself not ready; it keeps waiting.
DEFAULT_ACK_TIMEOUT_S = 30.0
# librdkafka producer settings that wait out a broker outage of any length: a record is never
# failed locally for its age (librdkafka's default gives up after 5 minutes).
NEVER_TIME_OUT: dict[str, Any] = {"message.timeout.ms": 0}

# librdkafka's default `message.max.bytes`: the largest record a producer accepts.
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
# What librdkafka adds to a record's key and value when it checks `message.max.bytes` (the
# record's framing; relata sends no headers): records queued for a later hand-over are checked
# against the limit less this.
RECORD_OVERHEAD_BYTES = 512

DeliveryReport = Callable[[Any, Any], None]


class KafkaIOError(RuntimeError):
    """Root of this package's errors."""


class DeliveryError(KafkaIOError):
    """Records were not acknowledged by the broker; the inputs they answer are not committed,
    so they will be redone."""


class RecordRefusedError(KafkaIOError):
    """The client refused one record before queueing it (too large, ...): nothing was sent.
    Redoing would refuse it again, so the caller dead-letters the input it answers."""

    def __init__(self, message: str, *, topic: str, size: int) -> None:
        super().__init__(message)
        self.topic = topic
        self.size = size


def record_size(key: bytes | None, value: bytes | None) -> int:
    """The bytes of a record's key and value."""
    return (0 if key is None else len(key)) + (0 if value is None else len(value))


def max_message_bytes(config: dict[str, Any]) -> int:
    """A producer configuration's `message.max.bytes` (librdkafka's default when unset)."""
    return int(config.get("message.max.bytes", DEFAULT_MAX_MESSAGE_BYTES))


def produce(
    producer: Producer,
    topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    partition: int | None = None,
    on_delivery: DeliveryReport | None = None,
    headers: Headers | None = None,
) -> None:
    """Produce one record, waiting for queue space instead of failing when librdkafka's queue
    is full (back-pressure); `partition` None: by the key; `on_delivery(error, message)` is its
    delivery report. A record the client refuses outright raises `RecordRefusedError` (its
    delivery report never comes)."""
    extra: dict[str, Any] = {}
    if partition is not None:
        extra["partition"] = partition
    if headers:
        extra["headers"] = list(headers)
    if on_delivery is not None:
        extra["on_delivery"] = on_delivery
    while True:
        try:
            producer.produce(topic, key=key, value=value, **extra)
            return
        except BufferError:  # librdkafka's queue is full: let it drain
            producer.poll(BUFFER_FULL_POLL_S)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.fatal():
                raise  # the client cannot go on: not this record's fault
            size = record_size(key, value)
            msg = f"{topic}: record of {size} bytes refused by the producer: {error or exc}"
            raise RecordRefusedError(msg, topic=topic, size=size) from exc


class AckWait:
    """When a wait for acknowledgements began, and its once-per-interval log lines."""

    def __init__(self, what: str, *, ack_timeout_s: float) -> None:
        self.what = what
        self.ack_timeout_s = ack_timeout_s
        self.since: float | None = None  # time.monotonic() of the start; None: not waiting
        self._next_log = 0.0

    def begin(self) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self._next_log = self.since + self.ack_timeout_s

    def waiting(self, remaining: int) -> None:
        """Log (once per `ack_timeout_s`) that `remaining` records are still unacknowledged."""
        now = time.monotonic()
        if self.since is not None and now >= self._next_log:
            self._next_log = now + self.ack_timeout_s
            logger.warning(
                "waiting for the broker what=%s unacknowledged=%d seconds=%.0f",
                self.what,
                remaining,
                now - self.since,
            )

    def end(self) -> None:
        if self.since is not None:
            waited = time.monotonic() - self.since
            if waited >= self.ack_timeout_s:
                logger.warning("broker acknowledged again what=%s seconds=%.1f", self.what, waited)
        self.since = None


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


@dataclass(frozen=True, slots=True)
class _Refused:
    """The message of a delivery report for a record refused before it was queued."""

    _topic: str
    _partition: int | None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return -1 if self._partition is None else self._partition


@dataclass(slots=True)
class _Batch:
    """The input offsets of one consumed batch and the delivery reports of its records."""

    offsets: dict[Partition, int]  # next offset to commit, per (topic, partition)
    open: bool
    deliveries: Deliveries = field(default_factory=Deliveries)
    closed_at: float = 0.0  # time.monotonic() when closed


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
    uncommitted input) are checked the same way. `flush` waits for everything (or until
    stopped). A broker that does not answer is waited out: nothing is dropped or committed past.
    `stop`: set when the process stops, so no wait outlasts it.
    """

    def __init__(
        self,
        producer: Producer,
        *,
        max_unacked: int = MAX_UNACKED_BATCHES,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        stop: threading.Event | None = None,
    ) -> None:
        self.producer = producer
        self.max_unacked = max_unacked
        self.ack_timeout_s = ack_timeout_s
        self.stop = stop or threading.Event()
        self._batches: deque[_Batch] = deque()
        self._committable: dict[Partition, int] = {}
        self._wait = AckWait("outputs", ack_timeout_s=ack_timeout_s)

    def begin(self, messages: Sequence[Message]) -> None:
        """Open the batch of `messages` (closing the one before, if still open)."""
        while len(self._batches) >= self.max_unacked:  # back-pressure: the broker is behind
            if self.stop.is_set():
                break  # the loop ends after this batch; nothing past it is committed
            self._wait.begin()
            self.producer.poll(BUFFER_FULL_POLL_S)
            self.settle()
            self._wait.waiting(self.outstanding)
        self._wait.end()
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
        if self._batches and self._batches[-1].open:
            self._batches[-1].open = False
            self._batches[-1].closed_at = time.monotonic()

    def produce(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        on_acked: Callable[[], None] | None = None,
    ) -> None:
        """Produce one record for the open batch (or a batch of its own outside one);
        `on_acked` runs when the broker acknowledged it (from `settle`/`flush`). Raises
        `RecordRefusedError` when the client refuses it (nothing is sent)."""
        batch = self._batches[-1] if self._batches else None
        if batch is None or (not batch.open and batch.offsets):  # no batch open: one of its own
            batch = _Batch({}, open=False, closed_at=time.monotonic())
            self._batches.append(batch)
        report = batch.deliveries.expect()
        if on_acked is None:
            callback = report
        else:

            def callback(error: Any, message: Any) -> None:
                report(error, message)
                if error is None:
                    on_acked()

        try:
            produce(self.producer, topic, key=key, value=value, on_delivery=callback)
        except RecordRefusedError:
            batch.deliveries.outstanding -= 1  # no delivery report will come
            raise

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

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every record is acknowledged, `timeout` seconds at most (None: as long
        as it takes, logging once per `ack_timeout_s`), or until `stop` is set; returns how
        many are still unacknowledged (their batches' offsets stay uncommitted). Raises
        `DeliveryError` when a record was refused."""
        self.end()
        deadline = None if timeout is None else time.monotonic() + timeout
        remaining = self.producer.flush(0)
        if remaining:
            self._wait.begin()
        while remaining and not self.stop.is_set():
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                break
            remaining = self.producer.flush(left)
            self._wait.waiting(remaining)
        if not remaining:
            self._wait.end()
        self.settle()
        return remaining

    @property
    def outstanding(self) -> int:
        """Records produced and not acknowledged yet."""
        return sum(batch.deliveries.outstanding for batch in self._batches)

    @property
    def waiting_since(self) -> float | None:
        """time.monotonic() since when the oldest closed batch waits for acknowledgement."""
        batches = self._batches
        if not batches or batches[0].open or batches[0].deliveries.outstanding <= 0:
            return None
        return batches[0].closed_at

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

    producer: Producer = ConfluentProducer(
        {**config, "enable.idempotence": True, "linger.ms": 1, **NEVER_TIME_OUT}
    )
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
    agent rather than commit past an output that was lost. A broker that does not answer is
    waited out (logged once per `ack_timeout_s`; `waiting_since` tells the probes); cancelling
    the flush (a stop) leaves the inputs unacknowledged.
    """

    def __init__(
        self,
        producer: Producer,
        *,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._producer = producer
        self._wait = AckWait("outputs", ack_timeout_s=ack_timeout_s)
        # Records are handed to librdkafka at the flush; one it would refuse for its size is
        # refused when queued instead, while the caller knows the input it answers.
        self.max_record_bytes = max_message_bytes - RECORD_OVERHEAD_BYTES
        self._deliveries = Deliveries()
        self._queued: list[tuple[str, bytes | None, bytes | None, int | None, Headers | None]]
        self._queued = []

    @classmethod
    def from_config(
        cls, config: dict[str, Any], *, ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S
    ) -> ConfluentSender:
        """A sender over a new `batch_producer(config)`."""
        return cls(
            batch_producer(config),
            ack_timeout_s=ack_timeout_s,
            max_message_bytes=max_message_bytes(config),
        )

    @property
    def waiting_since(self) -> float | None:
        """time.monotonic() since when a flush waits for acknowledgements; None: not waiting."""
        return self._wait.since

    def check_broker(self, topic: str, timeout_s: float) -> None:
        """One metadata request for `topic` through this producer's connections; raises
        `KafkaException` when the brokers do not answer within `timeout_s`."""
        self._producer.list_topics(topic, timeout=timeout_s)  # type: ignore[attr-defined]

    def produce(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        """Queue one record for the next `flush` (`partition` None: librdkafka's partitioner
        on the key). A record too large for the producer raises `RecordRefusedError` (nothing
        is queued)."""
        size = record_size(key, value)
        if size > self.max_record_bytes:
            msg = (
                f"{topic}: record of {size} bytes refused: over the producer's limit of "
                f"{self.max_record_bytes} bytes (message.max.bytes less framing)"
            )
            raise RecordRefusedError(msg, topic=topic, size=size)
        self._queued.append((topic, key, value, partition, headers))

    @property
    def queued(self) -> int:
        """Records produced since the last `flush` (not yet handed to librdkafka)."""
        return len(self._queued)

    def _hand_over(self) -> None:
        queued, self._queued = self._queued, []
        producer, deliveries = self._producer, self._deliveries
        for topic, key, value, partition, headers in queued:
            report = deliveries.expect()
            try:
                produce(
                    producer,
                    topic,
                    key=key,
                    value=value,
                    partition=partition,
                    on_delivery=report,
                    headers=headers,
                )
            except RecordRefusedError as exc:
                # Its input is no longer known here: counted as refused, so `flush` raises
                # `DeliveryError` and the batch is redone (sizes were checked when queued, so
                # this is some other refusal, such as an unknown partition).
                report(str(exc), _Refused(topic, partition))

    async def flush(self) -> None:
        """Send every queued record and wait until all are acknowledged, however long the
        broker is away; raise if one was refused."""
        self._hand_over()
        # Polled on the event loop: `poll(0)` serves the delivery reports. librdkafka's
        # blocking `flush` in a thread costs about twice the broker round trip (it re-checks
        # every 10 ms, and every hand-over between threads waits for the GIL).
        self._producer.poll(0)
        if not self._deliveries.outstanding:
            self._deliveries.raise_refused("the inputs they answer are not acknowledged")
            return
        started = time.monotonic()
        self._wait.begin()
        pause = FLUSH_POLL_S
        try:
            while remaining := self._deliveries.outstanding:
                await asyncio.sleep(pause)
                self._producer.poll(0)
                if time.monotonic() - started > 1.0:  # the broker is slow or away: back off
                    pause = min(FLUSH_POLL_MAX_S, pause * 2)
                    self._wait.waiting(remaining)
        finally:
            self._wait.end()
        self._deliveries.raise_refused("the inputs they answer are not acknowledged")
