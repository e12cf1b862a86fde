"""Consuming: the consume-error policy, committing only acknowledged offsets, and the
consumer lag gauge."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

from confluent_kafka import Consumer as ConfluentConsumer
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from prometheus_client import Gauge

from .client import Consumer, Message, Partition

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


def usable(messages: Iterable[M]) -> list[M]:
    """The records of a consume() result, without its client-side events.

    Partition EOF is skipped silently; a fatal error (the client cannot go on: fenced,
    unrecoverable idempotence state, ...) raises `KafkaException`; any other error is logged
    and skipped (librdkafka retries those on its own).
    """
    out: list[M] = []
    for msg in messages:
        error = msg.error()
        if error is None:
            out.append(msg)
        elif error.code() == KafkaError._PARTITION_EOF:
            continue
        elif error.fatal():
            raise KafkaException(error)
        else:
            logger.warning("consume error topic=%s error=%s", msg.topic(), error)
    return out


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
    consumer.commit(
        offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=True
    )


def commit(consumer: Consumer, *, asynchronous: bool = True) -> None:
    """Commit the consumed (or stored) positions; their outputs were acknowledged first, so a
    lost commit only redoes records. Nothing to commit is fine."""
    try:
        consumer.commit(asynchronous=asynchronous)
    except KafkaException as exc:
        if exc.args and isinstance(exc.args[0], KafkaError):
            if exc.args[0].code() == KafkaError._NO_OFFSET:
                return
        elif "NO_OFFSET" in str(exc):
            return
        raise


class CommitRetry:
    """Offsets whose asynchronous commit failed (the broker was away, the group was
    rebalancing), kept to be committed again. Without it a loop that goes idle after an outage
    leaves its last offsets uncommitted: a restart would redo that work, and its lag would show
    work that is done. `on_commit` is librdkafka's callback (the consumer's `on_commit`
    setting, served by `consume`); `take` hands the offsets to commit again."""

    def __init__(self) -> None:
        self._failed: dict[Partition, int] = {}

    def on_commit(self, error: Any, partitions: Sequence[Any]) -> None:
        for tp in partitions:
            if tp.offset is None or tp.offset < 0:
                continue
            key = (tp.topic, tp.partition)
            if error is None and getattr(tp, "error", None) is None:
                if self._failed.get(key, -1) <= tp.offset:
                    self._failed.pop(key, None)  # committed, or passed by a later commit
            else:
                self._failed[key] = max(self._failed.get(key, -1), tp.offset)
        if error is not None:
            logger.info("offset commit failed, to be retried error=%s", error)

    def take(self) -> dict[Partition, int]:
        """The offsets to commit again (forgotten here: a new failure reports them again)."""
        out, self._failed = self._failed, {}
        return out


class LagReporter:
    """Sets `gauge{topic}` to the records between the consumer's positions and the high
    watermarks of its assigned partitions, at most every `interval_s`, from the client's
    cached watermarks (lag is a trend; a broker round trip per batch would cost latency).

    A topic reported once and no longer assigned reads 0 (this consumer is not behind on it).
    """

    def __init__(self, consumer: Any, gauge: Gauge, *, interval_s: float = 5.0) -> None:
        self._consumer = consumer
        self._gauge = gauge
        self._interval_s = interval_s
        self._next = 0.0
        self._reported: set[str] = set()

    def maybe_report(self) -> None:
        """Report now if `interval_s` passed since the last report; never raises."""
        now = time.monotonic()
        if now < self._next or not hasattr(self._consumer, "assignment"):
            return
        self._next = now + self._interval_s
        try:
            lag = dict.fromkeys(self._reported, 0)
            partitions = self._consumer.assignment()
            for tp in self._consumer.position(partitions) if partitions else ():
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
                lag.setdefault(tp.topic, 0)
                if high is None or high < 0 or tp.offset is None or tp.offset < 0:
                    continue
                lag[tp.topic] += max(0, high - tp.offset)
        except Exception as exc:  # lag is advisory; never stop the loop for it
            logger.debug("lag report failed error=%s", exc)
            return
        for topic, value in lag.items():
            self._gauge.labels(topic=topic).set(value)
        self._reported.update(lag)


Callback = Callable[[Any, Any], None]


class RenewingConsumer:
    """A group consumer rebuilt when its partitions stay lost while the brokers answer.

    A consumer whose session timed out (a broker pause) rejoins by itself once polled; rarely,
    after a broker that came back fenced, librdkafka's group state never gets a coordinator
    again and the client waits with no partitions for good. After `renew_after_s` without
    partitions, if the brokers answer, the client is closed and a new one (same config, same
    subscription and callbacks) joins instead. Everything else is the current client's: other
    calls are passed through.

    Whether the brokers answer is `reachable()`: give it a check made through another client
    (the process's broker watch). The stuck client's own metadata request is only the
    fallback: a client wedged after a pause can fail those too, and would then never be
    renewed.
    """

    def __init__(
        self,
        build: Callable[[], Any],
        *,
        renew_after_s: float,
        reachable: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build = build
        self._inner: Any = build()
        self.renew_after_s = renew_after_s
        self._reachable = reachable or self._answers_metadata
        self._clock = clock
        self._subscription: tuple[list[str], dict[str, Callback]] | None = None
        self._lost_since: float | None = None
        self.renewals = 0

    def subscribe(self, topics: Sequence[str], **callbacks: Callback) -> None:
        """`Consumer.subscribe`, remembered for a renewal."""
        self._subscription = (list(topics), dict(callbacks))
        self._subscribe()

    def _subscribe(self) -> None:
        assert self._subscription is not None
        topics, callbacks = self._subscription
        on_assign, on_lost = callbacks.get("on_assign"), callbacks.get("on_lost")

        def assigned(consumer: Any, partitions: Any) -> None:
            self._lost_since = None
            if on_assign is not None:
                on_assign(consumer, partitions)

        def lost(consumer: Any, partitions: Any) -> None:
            if partitions and self._lost_since is None:
                self._lost_since = self._clock()
            if on_lost is not None:
                on_lost(consumer, partitions)

        self._inner.subscribe(topics, **(callbacks | {"on_assign": assigned, "on_lost": lost}))

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        """`Consumer.consume`, after renewing the client when it is stuck without partitions."""
        self._maybe_renew()
        messages: list[Any] = self._inner.consume(num_messages=num_messages, timeout=timeout)
        return messages

    def _maybe_renew(self) -> None:
        since = self._lost_since
        if since is None or self._subscription is None:
            return
        waited = self._clock() - since
        if waited < self.renew_after_s:
            return
        topics, _ = self._subscription
        if not self._reachable():  # the brokers are away: a new client would wait the same
            return
        logger.warning(
            "partitions lost for %.0f s while the brokers answer; renewing the consumer topics=%s",
            waited,
            ",".join(topics),
        )
        old, self._inner = self._inner, None
        try:
            old.close()
        except (KafkaException, RuntimeError) as exc:
            logger.warning("closing the stuck consumer failed error=%s", exc)
        self._inner = self._build()
        self._lost_since = self._clock()  # the new client gets as long to join
        self._subscribe()
        self.renewals += 1

    def _answers_metadata(self) -> bool:
        assert self._subscription is not None
        try:
            self._inner.list_topics(self._subscription[0][0], timeout=1.0)
        except KafkaException:
            return False
        return True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not built yet (or a private name): never the client's
            raise AttributeError(name)
        return getattr(self._inner, name)


def renewing_consumer(
    config: dict[str, Any], *, renew_after_s: float, reachable: Callable[[], bool] | None = None
) -> RenewingConsumer:
    """A confluent-kafka consumer of `config`, renewed when stuck without partitions."""
    return RenewingConsumer(
        partial(ConfluentConsumer, config), renew_after_s=renew_after_s, reachable=reachable
    )
