"""A Faust App whose Kafka consumer uses a configurable `fetch_max_wait_ms` (and
`fetch_min_bytes`) and whose streams batch with `BatchingStream.take_batches`, and the agents'
librdkafka sender.

faust-streaming 0.15.3 hard-codes `fetch_max_wait_ms=1500` for the worker consumer and
exposes no setting for it (`broker_max_poll_interval` is the rebalance liveness bound, not the
fetch wait; `app.conf` has no consumer passthrough). We subclass the consumer thread and set
the value on the aiokafka consumer before it starts (aiokafka reads it in `start()`).

Measured on one local broker, 1000 events at 100/s (2 busy shared cores): event ->
profile-update p50 4-11 ms whether the wait is 1500, 100 or 10 ms. The broker answers a
waiting fetch as soon as data arrives, so in steady state the wait does not bound latency; it
matters when a fetch is in flight while partitions are resumed or assigned (Faust pauses
partitions during recovery and when stream buffers fill), where 1500 ms stalls are possible.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import faust
from faust.streams import current_event
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.utils.locks import Event

logger = logging.getLogger(__name__)


def _transport_class(fetch_max_wait_ms: int, fetch_min_bytes: int) -> type[Any]:
    class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            if hasattr(consumer, "_fetch_max_wait_ms") and hasattr(consumer, "_fetch_min_bytes"):
                consumer._fetch_max_wait_ms = fetch_max_wait_ms
                consumer._fetch_min_bytes = fetch_min_bytes
            else:  # a future aiokafka renamed them: keep Faust's values and say so
                logger.warning("cannot set the fetch wait on %s", type(consumer).__name__)
            return consumer

    class Consumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> Any:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class Transport(faust_aiokafka.Transport):
        pass

    Transport.Consumer = Consumer
    return Transport


class BatchingStream(faust.Stream[Any]):
    """A Faust stream with `take_batches`: micro-batches whose window runs while the previous
    batch is being handled."""

    async def take_batches(self, max_: int, within: float) -> AsyncIterator[list[Any]]:
        """Yield the buffered events every `within` seconds, or as soon as `max_` are buffered;
        each batch's events are acknowledged once the consumer asks for the next batch (never
        when its handling raised: Faust's `take_events` acknowledges them then too).

        Unlike Faust's `take_events`, whose window starts again only after the consumer is
        done with a batch (a cycle of window + handling time, and no events buffered meanwhile),
        the next batch's window starts when a batch is handed out and events keep arriving into
        it: a cycle is max(window, handling time). Same batch rate at light load, up to one
        handling time less latency under load, and a batch that took longer than the window is
        followed at once by the events that arrived during it.
        """
        events: list[Any] = []
        full = Event()
        handled = Event()
        enable_acks = self.enable_acks

        async def add_to_buffer(value: Any) -> Any:
            # The drainer task's own current event (a context variable): the consumer of the
            # batches sets `Stream.current_event` too (before its table writes), concurrently.
            event = current_event()
            if event is None:
                raise RuntimeError("take_batches found no current event")
            events.append(event)
            if len(events) >= max_:
                # A full batch: take no more events until it has been handled (as take_events).
                handled.clear()
                full.set()
                await self.wait(handled)
            return value

        # The batches are acknowledged here, after the consumer is done with them.
        self.enable_acks = False
        self.add_processor(add_to_buffer)
        self._enable_passive(cast(Any, aiter(self.channel)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        try:
            while not self.should_stop:
                timeout = deadline - loop.time()
                if timeout > 0 and len(events) < max_:
                    await self.wait_for_stopped(full, timeout=timeout)
                deadline = loop.time() + within
                if not events:
                    continue
                batch = events[:]
                events.clear()
                full.clear()
                yield batch
                # Reached only when the consumer asks for the next batch: a batch whose handler
                # raised (or was cancelled) stays unacknowledged and is delivered again.
                for event in batch:
                    await self.ack(event)
                handled.set()
        finally:
            handled.set()
            self.enable_acks = enable_acks
            self._processors.remove(add_to_buffer)


class App(faust.App):
    """faust.App whose streams are `BatchingStream`s, with `fetch_max_wait_ms` and
    `fetch_min_bytes` for its (aiokafka) worker consumer. A larger `fetch_min_bytes` lets the
    broker gather data before it answers: one fetch round trip per many records instead of one
    per record, where latency can wait."""

    def __init__(
        self, *args: Any, fetch_max_wait_ms: int = 1500, fetch_min_bytes: int = 1, **kwargs: Any
    ) -> None:
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._fetch_min_bytes = fetch_min_bytes
        kwargs.setdefault("Stream", BatchingStream)
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Any:
        transport_cls = _transport_class(self._fetch_max_wait_ms, self._fetch_min_bytes)
        return transport_cls(self.conf.broker_consumer, self)


# How often `ConfluentSender.flush` checks for acknowledgements.
FLUSH_POLL_S = 0.0005


class DeliveryError(RuntimeError):
    """The broker did not acknowledge records the stream processor produced."""


class ConfluentSender:
    """The agents' outputs through librdkafka (confluent-kafka).

    Faust's send path cost ~0.8 ms of the event loop per record (measured at 400 events/s:
    two sends per event were two thirds of the profile agent's time); librdkafka's `produce`
    is a C call of microseconds and batches on its own threads. `produce` only queues a record
    here; `flush` hands the batch's records to librdkafka in one go (so they travel in one
    produce request: handed over one by one while the agent folded, they went out in 2-4
    requests a batch, ~60 % of the broker's produce requests at 500 events/s) and waits (the
    event loop keeps running) until the broker acknowledged everything. The agents flush before
    their input offsets are acknowledged, so delivery stays at least once. A record the broker
    refused after librdkafka's retries raises `DeliveryError` from `flush`, which stops the
    agent rather than commit past an output that was lost.
    """

    def __init__(self, config: dict[str, str], *, flush_timeout_s: float = 30.0) -> None:
        from confluent_kafka import Producer

        self._producer = Producer(
            {
                **config,
                "enable.idempotence": True,
                # Covers the hand-over of one batch's records in `flush` (a tight loop of C
                # calls), so they leave together; the agents flush per batch anyway.
                "linger.ms": 1,
            }
        )
        self._flush_timeout_s = flush_timeout_s
        self._failures: list[str] = []
        self._queued: list[tuple[str, bytes | None, bytes | None, int | None]] = []

    def produce(
        self, topic: str, *, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None:
        """Queue one record for the next `flush` (`partition` None: librdkafka's murmur2
        partitioner on the key)."""
        self._queued.append((topic, key, value, partition))

    @property
    def queued(self) -> int:
        """Records produced since the last `flush` (not yet handed to librdkafka)."""
        return len(self._queued)

    def _hand_over(self) -> None:
        queued, self._queued = self._queued, []
        produce = self._producer.produce
        delivered = self._delivered
        for topic, key, value, partition in queued:
            while True:
                try:
                    if partition is None:
                        produce(topic, value=value, key=key, on_delivery=delivered)
                    else:
                        produce(
                            topic, value=value, key=key, partition=partition, on_delivery=delivered
                        )
                    break
                except BufferError:  # librdkafka's queue is full: let it drain (backpressure)
                    self._producer.poll(0.05)

    def _delivered(self, error: Any, message: Any) -> None:
        if error is not None:
            self._failures.append(f"{message.topic()}: {error}")

    async def flush(self) -> None:
        """Send every queued record and wait until all are acknowledged; raise if one was
        refused."""
        self._hand_over()
        # Polled on the event loop: `len(producer)` counts records not yet acknowledged, and
        # `poll(0)` serves their delivery reports. librdkafka's blocking `flush` in a thread
        # measured 10-14 ms per batch against a ~5 ms broker round trip (it re-checks every
        # 10 ms, and every hand-over between threads waits for the GIL).
        deadline = time.monotonic() + self._flush_timeout_s
        self._producer.poll(0)
        while (remaining := len(self._producer)) and time.monotonic() < deadline:
            await asyncio.sleep(FLUSH_POLL_S)
            self._producer.poll(0)
        if remaining:
            msg = (
                f"{remaining} records not acknowledged within {self._flush_timeout_s:.0f} s; "
                "is the broker reachable?"
            )
            raise DeliveryError(msg)
        if self._failures:
            failures, self._failures = self._failures, []
            msg = f"{len(failures)} records refused by the broker, first: {failures[0]}"
            raise DeliveryError(msg)
