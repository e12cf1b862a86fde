"""Live quality's consumer: `behavior-events` joined with the published lists (`recommendations`
and, with a shadow, `recommendations-shadow`), judged by `workers.quality`, exported as metrics.

One consumer reads the three co-partitioned topics (keyed by user_id, the same partition count,
murmur2) with the range assignor, which gives a member the same partition numbers of every
topic: partition n of the events meets partition n of the lists, and the role scales by
partitions like the others.

Delivery: at least once, with an exact count inside a run. Offsets are committed for events
only, up to the last event judged (`Holdback.committable`), every `commit_interval_ms`. The
lists are state, not work: at every assignment each list partition is read again from
`window_s` ago (the lists an event can still be judged against), so nothing of them is
committed; a new group starts its events there too. A re-delivered event is judged once
(`event_id`, the last `dedup_size`); after a restart the counters start from zero (Prometheus
counters do) and the events since the last commit are judged again in the new process.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kafkaio.client import Message
from kafkaio.consumer import CommitRetry, LagReporter, commit_offsets, usable
from kafkaio.health import LoopWatch
from schemas.decoding import Rejection, decode, key_text
from schemas.messages import BehaviorEvent, Recommendation
from schemas.quality_settings import QualitySettings
from workers.metrics import QualityMetrics
from workers.quality import JUDGED_EVENT_TYPES, Action, Holdback, PublishedList, QualityJoin

logger = logging.getLogger(__name__)

LIVE = "live"
SHADOW = "shadow"
# Events held for their lists at most; past it the oldest are judged as they are (see Holdback).
MAX_PENDING = 100_000
# Records per consume call.
MAX_BATCH = 1000
# Longest wait of one consume call when nothing arrives (the loop's beat for the probes).
POLL_TIMEOUT_S = 0.2
# Blocking broker requests made while partitions are assigned (offsets by time, watermarks).
ASSIGN_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class QualityTopics:
    events: str
    lists: Mapping[str, str]  # variant -> its list topic


def kafka_ts_ms(message: Message, clock: Callable[[], float]) -> int:
    """A record's Kafka timestamp in ms (the clock's now when the broker gave none)."""
    kind, ts = message.timestamp()
    return int(ts) if kind != 0 and ts >= 0 else int(clock() * 1000)


class QualityMonitor:
    """The loop: `poll_once()` reads a batch and judges what is ready; `run()` loops."""

    def __init__(
        self,
        *,
        consumer: Any,
        metrics: QualityMetrics,
        topics: QualityTopics,
        settings: QualitySettings,
        clock: Callable[[], float] = time.time,
        watch: LoopWatch | None = None,
        commit_retry: CommitRetry | None = None,
    ) -> None:
        self.consumer = consumer
        self.metrics = metrics
        self.topics = topics
        self.settings = settings
        self.clock = clock
        self.watch = watch or LoopWatch("quality")
        self.commit_retry = commit_retry or CommitRetry()
        self.variant_of = {topic: variant for variant, topic in topics.lists.items()}
        variants = tuple(topics.lists)
        self.join = QualityJoin(
            variants,
            window_ms=settings.window_s * 1000,
            max_users=settings.max_users,
            dedup_size=settings.dedup_size,
        )
        self.holdback = Holdback(
            variants, delay_ms=settings.judge_delay_ms, max_pending=MAX_PENDING
        )
        # Next offset of each list partition: read so far, or where it was assigned from.
        self._list_positions: dict[tuple[str, int], int] = {}
        self._next_commit = 0.0
        self._lag = LagReporter(consumer, metrics.consumer_lag)

    # -- assignment ---------------------------------------------------------------------------

    def subscribe(self) -> None:
        """Subscribe to the events and every variant's lists (the consumer is built with the
        range assignor, so the partition numbers of all of them match)."""
        self.consumer.subscribe(
            [self.topics.events, *self.topics.lists.values()],
            on_assign=self._assigned,
            on_revoke=self._revoked,
            on_lost=self._lost,
        )

    def _assigned(self, consumer: Any, partitions: Sequence[Any]) -> None:
        """Lists from `window_s` ago; events from the committed offset, or, for a new group,
        from the same time."""
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, TopicPartition

        since_ms = int((self.clock() - self.settings.window_s) * 1000)
        events = [tp for tp in partitions if tp.topic == self.topics.events]
        lists = [tp for tp in partitions if tp.topic in self.variant_of]
        try:
            committed = consumer.committed(events, timeout=ASSIGN_TIMEOUT_S) if events else []
            fresh = [tp for tp in committed if tp.offset < 0]
            by_time = [TopicPartition(tp.topic, tp.partition, since_ms) for tp in lists + fresh]
            found = consumer.offsets_for_times(by_time, timeout=ASSIGN_TIMEOUT_S) if by_time else []
            for tp in found:
                if tp.offset < 0:  # nothing since then: start at the end
                    tp.offset = consumer.get_watermark_offsets(tp, timeout=ASSIGN_TIMEOUT_S)[1]
            starts = {(tp.topic, tp.partition): tp.offset for tp in found}
        except Exception as exc:  # the broker away: the whole compacted lists, the events' reset
            logger.warning("quality rewind failed, reading the lists from the start error=%s", exc)
            starts = {(tp.topic, tp.partition): OFFSET_BEGINNING for tp in lists}
        assignment = [
            TopicPartition(
                tp.topic, tp.partition, starts.get((tp.topic, tp.partition), OFFSET_INVALID)
            )
            for tp in partitions
        ]
        consumer.assign(assignment)
        self._list_positions = {
            key: max(0, offset) for key, offset in starts.items() if key[0] in self.variant_of
        }
        self.watch.assigned()
        logger.info(
            "quality assigned partitions=%s lists_since_ms=%d",
            ",".join(f"{tp.topic}[{tp.partition}]" for tp in partitions),
            since_ms,
        )

    def _revoked(self, consumer: Any, partitions: Sequence[Any]) -> None:
        self._commit(force=True)
        self._forget(partitions)

    def _lost(self, consumer: Any, partitions: Sequence[Any]) -> None:
        logger.warning("partitions lost topic=%s count=%d", self.topics.events, len(partitions))
        if partitions:
            self.watch.lost()
        self._forget(partitions)

    def _forget(self, partitions: Sequence[Any]) -> None:
        self.holdback.forget(tp.partition for tp in partitions if tp.topic == self.topics.events)
        for tp in partitions:
            self._list_positions.pop((tp.topic, tp.partition), None)

    def caught_up(self, variant: str, partition: int) -> bool:
        """Whether this consumer has read every list of `variant`'s partition the broker has
        reported (its cached high watermark)."""
        from confluent_kafka import TopicPartition

        topic = self.topics.lists[variant]
        position = self._list_positions.get((topic, partition))
        if position is None:
            return False
        try:
            _, high = self.consumer.get_watermark_offsets(
                TopicPartition(topic, partition), cached=True
            )
        except Exception:  # not known yet
            return False
        return high is not None and high >= 0 and position >= high

    # -- the loop -----------------------------------------------------------------------------

    def _read(self, messages: Sequence[Message], now_ms: float) -> None:
        for msg in usable(messages):
            topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
            variant = self.variant_of.get(topic)
            if variant is not None:
                self._read_list(variant, msg)
                self._list_positions[(topic, partition)] = offset + 1
                continue
            event = decode(msg.value(), BehaviorEvent) if msg.value() is not None else None
            action = None
            if isinstance(event, BehaviorEvent) and event.event_type in JUDGED_EVENT_TYPES:
                action = Action(
                    event.event_id,
                    event.user_id,
                    event.item_id,
                    event.event_type,
                    kafka_ts_ms(msg, self.clock),
                )
            # Invalid events (dead-lettered by the stream processor) and others keep their
            # place, so the committed offset never passes an action not judged yet.
            self.holdback.add(partition, offset, action, now_ms=now_ms)

    def _read_list(self, variant: str, msg: Message) -> None:
        ts_ms = kafka_ts_ms(msg, self.clock)
        self.holdback.list_read(variant, msg.partition() or 0, ts_ms)
        raw = msg.value()
        if raw is None:  # a tombstone: the user was erased
            if user_id := key_text(msg.key()):
                self.join.erase(variant, user_id)
            return
        rec = decode(raw, Recommendation)
        if isinstance(rec, Rejection):  # not ours to dead-letter: the recommender wrote it
            logger.debug("unreadable list topic=%s reason=%s", msg.topic(), rec.reason)
            return
        # Item ids interned: the lists of many users share them (half the memory per user).
        items = tuple(sys.intern(i.item_id) for i in rec.items)
        self.join.publish(
            variant, rec.user_id, PublishedList(ts_ms, items, tuple(rec.trigger_event_ids))
        )
        self.metrics.lists.labels(variant=variant).inc()

    def _judge(self, actions: Sequence[Action]) -> int:
        metrics = self.metrics
        judged = 0
        for action in actions:
            verdicts = self.join.judge(action)
            if verdicts is None:
                metrics.duplicates.inc()
                continue
            for verdict in verdicts:
                if verdict.outcome != "judged":
                    metrics.unjudged.labels(variant=verdict.variant, reason=verdict.outcome).inc()
                    continue
                judged += 1
                labels = {"variant": verdict.variant, "event_type": verdict.event_type}
                metrics.judged.labels(**labels).inc()
                if verdict.rank is not None:
                    metrics.hits.labels(**labels).inc()
                    metrics.ndcg.labels(**labels).inc(verdict.ndcg)
                    metrics.hit_rank.labels(variant=verdict.variant).observe(verdict.rank)
        return judged

    def poll_once(self) -> int:
        """Read one batch, judge the actions whose lists are in; returns verdicts counted."""
        messages = self.consumer.consume(num_messages=MAX_BATCH, timeout=POLL_TIMEOUT_S)
        now_ms = time.monotonic() * 1000
        self._read(messages, now_ms)
        judged = self._judge(self.holdback.release(now_ms=now_ms, caught_up=self.caught_up))
        self.metrics.users.set(len(self.join))
        self._commit()
        self._lag.maybe_report()
        return judged

    def _commit(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_commit:
            return
        self._next_commit = now + self.settings.commit_interval_ms / 1000.0
        offsets = self.commit_retry.take()
        for partition, offset in self.holdback.committable().items():
            key = (self.topics.events, partition)
            offsets[key] = max(offsets.get(key, -1), offset)
        if offsets:
            commit_offsets(self.consumer, offsets)

    def run(self, stop_event: threading.Event) -> None:
        """Loop until `stop_event`; the caller closes the consumer."""
        logger.info(
            "quality started events=%s lists=%s window_s=%.0f",
            self.topics.events,
            ",".join(self.topics.lists.values()),
            self.settings.window_s,
        )
        while not stop_event.is_set():
            self.poll_once()
            self.watch.beat()
        self._commit(force=True)
        logger.info("quality stopped users=%d waiting=%d", len(self.join), len(self.holdback))
