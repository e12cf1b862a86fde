"""A Faust App whose Kafka consumer uses a configurable `fetch_max_wait_ms` (and
`fetch_min_bytes`), and the agents' librdkafka sender.

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
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

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


class App(faust.App):
    """faust.App with `fetch_max_wait_ms` and `fetch_min_bytes` for its (aiokafka) worker
    consumer. A larger `fetch_min_bytes` lets the broker gather data before it answers: one
    fetch round trip per many records instead of one per record, where latency can wait."""

    def __init__(
        self, *args: Any, fetch_max_wait_ms: int = 1500, fetch_min_bytes: int = 1, **kwargs: Any
    ) -> None:
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._fetch_min_bytes = fetch_min_bytes
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
    is a C call of microseconds and batches on its own threads. `flush` waits (the event loop
    keeps running) until the broker acknowledged everything sent; the agents flush before their input
    offsets are acknowledged, so delivery stays at least once. A record the broker refused
    after librdkafka's retries raises `DeliveryError` from `flush`, which stops the agent
    rather than commit past an output that was lost.
    """

    def __init__(self, config: dict[str, str], *, flush_timeout_s: float = 30.0) -> None:
        from confluent_kafka import Producer

        self._producer = Producer(
            {
                **config,
                "enable.idempotence": True,
                # The agents flush per batch; lingering would only add latency.
                "linger.ms": 0,
            }
        )
        self._flush_timeout_s = flush_timeout_s
        self._failures: list[str] = []

    def produce(
        self, topic: str, *, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None:
        """Queue one record (`partition` None: librdkafka's murmur2 partitioner on the key)."""
        while True:
            try:
                if partition is None:
                    self._producer.produce(topic, value=value, key=key, on_delivery=self._delivered)
                else:
                    self._producer.produce(
                        topic,
                        value=value,
                        key=key,
                        partition=partition,
                        on_delivery=self._delivered,
                    )
                break
            except BufferError:  # librdkafka's queue is full: wait for it to drain (backpressure)
                self._producer.poll(0.05)

    def _delivered(self, error: Any, message: Any) -> None:
        if error is not None:
            self._failures.append(f"{message.topic()}: {error}")

    async def flush(self) -> None:
        """Wait until every record sent so far is acknowledged; raise if one was refused."""
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
