"""The profile agent's input and state: behavior-events read in record batches with librdkafka,
and the `profiles` table it owns (one dict or RocksDB database per assigned partition, backed
by the compacted `<app id>-profiles-changelog` topic).

Why not a Faust agent: measured at 1,000 events/s on 2 cores, Faust's per-message path
(aiokafka's fetcher thread, the conductor, two asyncio tasks per message in its drain loop, the
stream queue, per-event acks) cost ~0.27 ms of CPU per event, four times the agent's own work
(decode, fold, encode: ~0.07 ms). Here a batch is one `consume` call, its offsets one
`store_offsets`. The rest of the stream processor (the association and recommendations
agents, the HTTP API) stays Faust.

Delivery is at least once, as before: a batch's offsets are stored only after the handler
returned with every output acknowledged by the broker, and committed from there every
`commit_interval_s` and when partitions are revoked. A partition's profiles are replayed from
its changelog partition when it is assigned (the consumer's rebalance callback, so no event of
it is handled first) and dropped when it is revoked or lost. Not done (Faust's tables had it):
standby replicas; a failover waits for the changelog replay of its partitions instead.

A broker outage is waited out: the handler's flush waits for the acknowledgements however long
it takes; partitions lost meanwhile (the session timed out) are dropped and, once the consumer
is polled again, rejoined and replayed; offsets of partitions no longer held are not stored; a
changelog replay that the broker interrupts is retried with backoff. A `LoopWatch` tells the
probes how the loop fares.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import orjson
from prometheus_client import Gauge

from kafkaio.consumer import LagReporter, commit, usable
from kafkaio.health import LoopWatch

logger = logging.getLogger(__name__)

# A restore reads the changelog this many records per call.
RESTORE_BATCH = 10_000
# Longest wait for the first event of a batch when idle (a stop is noticed within it).
IDLE_WAIT_S = 0.5
# How often the consumer lag gauge is refreshed.
LAG_REPORT_S = 5.0
# A changelog replay the broker interrupts is retried after this long, doubling up to the max.
RESTORE_RETRY_S = 0.5
RESTORE_RETRY_MAX_S = 5.0
# A changelog partition whose replay reads nothing for this long is asked for its end again.
RESTORE_STALL_S = 10.0


class _Stopping(Exception):
    """The consumer was asked to stop in the middle of a changelog replay."""


class Changelog(Protocol):
    """Where the store's changelog records go (the stream processor's `Sender`)."""

    def produce(
        self, topic: str, *, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None:
        """Queue one record for the next flush."""
        ...

    async def flush(self) -> None:
        """Return once every queued record is acknowledged."""
        ...


class PartitionNotAssignedError(KeyError):
    """A profile of a partition this worker does not own was read or written."""


def changelog_key(key: str) -> bytes:
    """A table key as Faust encodes its changelog keys (JSON), so existing changelogs stay
    readable."""
    return json.dumps(key).encode("utf-8")


class ProfileStore:
    """The latest profile (JSON bytes) per user, by partition of behavior-events.

    `put` writes the local copy and queues its changelog record to the same partition number
    of the changelog topic (`flush`, after the outputs and before the input offsets are
    stored, makes it durable). `directory` None keeps partitions in dicts; otherwise each is a RocksDB database
    (rocksdict) under it, rebuilt from the changelog when assigned.
    """

    def __init__(
        self, *, changelog_topic: str, changelog: Changelog, directory: Path | None = None
    ) -> None:
        self.changelog_topic = changelog_topic
        self._changelog = changelog
        self._directory = directory
        self._partitions: dict[int, MutableMapping[Any, Any]] = {}

    @property
    def partitions(self) -> set[int]:
        """The partitions whose profiles this store holds."""
        return set(self._partitions)

    def _partition(self, partition: int) -> MutableMapping[Any, Any]:
        try:
            return self._partitions[partition]
        except KeyError:
            msg = f"partition {partition} of {self.changelog_topic} is not assigned here"
            raise PartitionNotAssignedError(msg) from None

    def get(self, partition: int, key: str) -> bytes | None:
        """The stored value of `key` in its partition, or None."""
        data = self._partition(partition)
        value = data.get(self._key(key))
        return None if value is None else bytes(value)

    def put(self, partition: int, key: str, value: bytes) -> None:
        """Store `value` and queue its changelog record."""
        self._partition(partition)[self._key(key)] = value
        self._changelog.produce(
            self.changelog_topic, key=changelog_key(key), value=value, partition=partition
        )

    def delete(self, partition: int, key: str) -> None:
        """Remove `key` (if held) and queue its changelog tombstone."""
        data, stored = self._partition(partition), self._key(key)
        if data.get(stored) is not None:
            del data[stored]  # rocksdict has no pop
        self._changelog.produce(
            self.changelog_topic, key=changelog_key(key), value=None, partition=partition
        )

    async def flush(self) -> None:
        """Send the queued changelog records; return once they are acknowledged."""
        await self._changelog.flush()

    def keys(self) -> Iterator[str]:
        """Every key held (all partitions)."""
        for data in self._partitions.values():
            for key in data.keys():  # noqa: SIM118  # rocksdict raw mode cannot __iter__
                yield key.decode("utf-8") if isinstance(key, bytes) else key

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def _key(self, key: str) -> Any:
        return key if self._directory is None else key.encode("utf-8")

    def open(self, partition: int) -> None:
        """Start partition `partition` empty (its changelog is replayed with `restore`)."""
        self.close(partition)
        if self._directory is None:
            self._partitions[partition] = {}
            return
        from rocksdict import Options, Rdict

        path = self._directory / f"profiles-{partition}.db"
        shutil.rmtree(path, ignore_errors=True)  # rebuilt from the changelog
        path.parent.mkdir(parents=True, exist_ok=True)
        database: Any = Rdict(str(path), options=Options(raw_mode=True))
        self._partitions[partition] = database

    def restore(self, partition: int, records: Sequence[tuple[bytes | None, bytes | None]]) -> None:
        """Apply changelog records (key, value; None deletes) to an opened partition."""
        data = self._partition(partition)
        for raw_key, value in records:
            try:
                name = None if raw_key is None else orjson.loads(raw_key)
            except orjson.JSONDecodeError:  # not a key this store wrote: skip it, do not crash
                name = None
            if not isinstance(name, str):
                logger.warning(
                    "changelog record skipped: key %r is not a JSON string",
                    raw_key[:100] if raw_key else raw_key,
                )
                continue
            key = self._key(name)
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value

    def close(self, partition: int) -> None:
        """Drop partition `partition` (revoked, lost or stopping)."""
        data = self._partitions.pop(partition, None)
        if data is not None and hasattr(data, "close"):
            data.close()

    def close_all(self) -> None:
        """Drop every partition."""
        for partition in list(self._partitions):
            self.close(partition)


# A batch of records -> handled, outputs acknowledged (raises if they could not be).
Handler = Callable[[list[Any]], Awaitable[None]]
# One consumed message -> the handler's record type.
ToRecord = Callable[[Any], Any]


class EventBatchConsumer:
    """Consumes a topic in batches of up to `batch_max` records, a batch `window_s` after the
    previous one was handed out (or at once when full; handling time counts toward the window,
    so a cycle is max(window, handling)), keeping `store`'s partitions in step with the
    consumer group's assignment.

    All librdkafka calls run on one thread of its own (rebalance callbacks too, inside
    `consume`), never at the same time as a batch is being handled on the event loop.
    """

    def __init__(
        self,
        *,
        consumer_config: dict[str, Any],
        restore_config: dict[str, Any],
        topic: str,
        store: ProfileStore,
        handle: Handler,
        to_record: ToRecord,
        batch_max: int,
        window_s: float,
        client: Callable[[dict[str, Any]], Any] | None = None,
        lag_gauge: Gauge | None = None,
        on_restored: Callable[[int], None] | None = None,
        watch: LoopWatch | None = None,
    ) -> None:
        self.consumer_config = consumer_config
        self._restore_config = restore_config
        self._topic = topic
        self._store = store
        self._handle = handle
        self._to_record = to_record
        self._batch_max = batch_max
        self._window_s = window_s
        # Builds the consumers from a config (confluent_kafka.Consumer; a fake in unit tests).
        self._client = client or _confluent_consumer
        # Consumer lag by topic, reported every LAG_REPORT_S (`kafkaio.consumer.LagReporter`).
        self._lag_gauge = lag_gauge
        self._lag: LagReporter | None = None
        self._on_restored = on_restored
        self.watch = watch or LoopWatch("events")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="relata-events")
        self._consumer: Any = None
        self._stopping = False
        self._failure: Exception | None = None

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, fn, *args)

    async def run(self) -> None:
        """Consume and handle until cancelled or `stop`; then commit and leave the group."""
        self._consumer = self._client(self.consumer_config)
        if self._lag_gauge is not None:
            self._lag = LagReporter(self._consumer, self._lag_gauge, interval_s=LAG_REPORT_S)
        self._consumer.subscribe(
            [self._topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        pending: asyncio.Future[Any] | None = None
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._window_s
            while not self._stopping:
                pending = loop.run_in_executor(
                    self._thread, self._next_batch, max(0.0, deadline - loop.time())
                )
                messages = await pending
                pending = None
                self.watch.beat()
                deadline = loop.time() + self._window_s
                records = [self._to_record(m) for m in messages]
                if not records:
                    continue
                await self._handle(records)
                await self._call(self._store_offsets, messages)
                self.watch.beat()
        except asyncio.CancelledError:
            raise
        except _Stopping:
            pass
        except Exception as exc:
            self.watch.failed(exc)
            raise
        finally:
            self._stopping = True  # a changelog replay in progress gives up
            if pending is not None:  # cancelled mid-consume: let that call end first
                await asyncio.wait([pending])
            await self._call(self._close)

    def stop(self) -> None:
        """Ask `run` to end after the batch in hand."""
        self._stopping = True

    # ---- on the consumer thread -------------------------------------------------------
    def _next_batch(self, wait_s: float) -> list[Any]:
        consumer = self._consumer
        messages = consumer.consume(self._batch_max, timeout=wait_s)
        if not messages and not self._stopping:
            # Idle: block until the first event, then give the batch its window.
            first = consumer.consume(1, timeout=IDLE_WAIT_S)
            if first and self._batch_max > 1:
                first += consumer.consume(self._batch_max - 1, timeout=self._window_s)
            messages = first
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if self._lag is not None:
            self._lag.maybe_report()
        return usable(messages)

    def _store_offsets(self, messages: Sequence[Any]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        last: dict[int, int] = {}
        for message in messages:
            last[message.partition()] = max(last.get(message.partition(), -1), message.offset())
        # A partition lost while the batch waited for the broker is another member's now (or
        # ours again, replayed from the changelog): its events are redone, not stored past.
        held = {tp.partition for tp in self._consumer.assignment()}
        offsets = [TopicPartition(self._topic, p, o + 1) for p, o in last.items() if p in held]
        if len(offsets) < len(last):
            logger.info(
                "offsets not stored for partitions no longer held topic=%s partitions=%s",
                self._topic,
                ",".join(str(p) for p in sorted(set(last) - held)),
            )
        if not offsets:
            return
        try:
            self._consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:  # lost in between: redelivered, folded idempotently
            logger.warning("offsets not stored topic=%s error=%s", self._topic, exc)

    def _commit(self) -> None:
        from confluent_kafka import KafkaException

        try:
            # The stored offsets: those of batches whose outputs were acknowledged.
            commit(self._consumer, asynchronous=False)
        except KafkaException as exc:
            logger.warning("offset commit failed topic=%s error=%s", self._topic, exc)

    def _callback(self, fn: Callable[[Sequence[Any]], None], partitions: Sequence[Any]) -> None:
        # An exception raised into librdkafka's callback comes out of `consume` mangled: keep
        # it and raise it from `_next_batch` once `consume` returned.
        try:
            fn(partitions)
        except _Stopping as exc:
            self._failure = self._failure or exc
        except Exception as exc:
            logger.exception("rebalance callback failed topic=%s", self._topic)
            self._failure = self._failure or exc

    def _on_assign(self, consumer: Any, partitions: Sequence[Any]) -> None:
        self._callback(self._assigned, partitions)

    def _on_revoke(self, consumer: Any, partitions: Sequence[Any]) -> None:
        self._callback(self._revoked, partitions)

    def _on_lost(self, consumer: Any, partitions: Sequence[Any]) -> None:
        self._callback(self._lost, partitions)

    def _assigned(self, partitions: Sequence[Any]) -> None:
        self.watch.assigned()
        self.watch.beat()
        started = time.monotonic()
        reader = self._client(self._restore_config)
        try:
            restored = sum(self._restore_retrying(reader, p.partition) for p in partitions)
        finally:
            reader.close()
        if self._on_restored is not None:
            self._on_restored(restored)
        logger.info(
            "assigned topic=%s partitions=%s restored_records=%d seconds=%.2f",
            self._topic,
            ",".join(str(p.partition) for p in partitions),
            restored,
            time.monotonic() - started,
        )

    def _restore_retrying(self, reader: Any, partition: int) -> int:
        """`_restore`, again from the start (with backoff) while the broker interrupts it."""
        from confluent_kafka import KafkaException

        pause = RESTORE_RETRY_S
        while True:
            try:
                return self._restore(reader, partition)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if error is not None and hasattr(error, "fatal") and error.fatal():
                    raise
                logger.warning(
                    "changelog replay interrupted, retrying partition=%d in=%.1fs error=%s",
                    partition,
                    pause,
                    exc,
                )
            if self._stopping:
                raise _Stopping
            self.watch.beat()
            time.sleep(pause)
            pause = min(RESTORE_RETRY_MAX_S, pause * 2)

    def _restore(self, reader: Any, partition: int) -> int:
        """Rebuild one partition's profiles from its changelog partition (to its end)."""
        from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

        self._store.open(partition)
        topic = self._store.changelog_topic
        low, high = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        if high <= low:
            return 0
        reader.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        count, position = 0, low
        quiet_since = time.monotonic()
        while position < high:
            if self._stopping:
                raise _Stopping
            batch = reader.consume(RESTORE_BATCH, timeout=1.0)
            self.watch.beat()
            if not batch:  # the end may be offsets without records (compaction, markers)
                (current,) = reader.position([TopicPartition(topic, partition)])
                position = max(position, current.offset)
                if time.monotonic() - quiet_since > RESTORE_STALL_S:
                    msg = f"no changelog records for {RESTORE_STALL_S:.0f} s"
                    raise KafkaException(msg)  # retried from the start: the broker is away
                continue
            quiet_since = time.monotonic()
            records = []
            for message in batch:
                if message.error() is not None:
                    continue
                records.append((message.key(), message.value()))
                position = int(message.offset() or 0) + 1
            self._store.restore(partition, records)
            count += len(records)
        reader.unassign()
        return count

    def _revoked(self, partitions: Sequence[Any]) -> None:
        # Every handled batch's offsets are stored (handling and consuming take turns).
        self._commit()
        self._drop(partitions, logging.INFO, "revoked")

    def _lost(self, partitions: Sequence[Any]) -> None:
        if partitions:
            self.watch.lost()  # until the consumer rejoins and gets an assignment again
        self._drop(
            partitions, logging.WARNING, "lost (not committed: re-delivered to their new owner)"
        )

    def _drop(self, partitions: Sequence[Any], level: int, what: str) -> None:
        for p in partitions:
            self._store.close(p.partition)
        logger.log(
            level,
            "%s topic=%s partitions=%s",
            what,
            self._topic,
            ",".join(str(p.partition) for p in partitions),
        )

    def _close(self) -> None:
        if self._consumer is not None:
            self._commit()
            self._consumer.close()  # revokes (and so drops) the partitions, leaves the group
            self._consumer = None
        self._store.close_all()


def _confluent_consumer(config: dict[str, Any]) -> Any:
    from confluent_kafka import Consumer

    return Consumer(config)
