"""Observing the pipeline from outside: the event→recommendation latency probe, consumer-group
lag and the processes' Prometheus metrics."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from relata.runtime.latency import LatencySeries
from relata.runtime.tail import make_consumer
from schemas.settings import KafkaSettings
from schemas.topics import DEAD_LETTER, PROFILE_UPDATES, RECOMMENDATIONS

logger = logging.getLogger(__name__)

CANARY_PREFIX = "relata-canary-"


@dataclass
class ProbeStats:
    recommendations: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)


class RecommendationProbe:
    """Consumes `recommendations`, `profile-updates` and `dead-letter`; records
    event→recommendation latency and the stream processor's share of it.

    Two measures: `reported` is the message's own `latency_ms` (the recommender's clock);
    `measured` is this probe's consume time minus the send time of the oldest triggering
    event that the replay recorded (independent of the pipeline's own accounting).
    `profile_stage` is the same clock for profile updates: event → profile update consumed,
    the stream processor's part (batch window, fold, acknowledgement, two broker hops).
    """

    def __init__(self, kafka: KafkaSettings, *, sent_at: MutableMapping[str, float]) -> None:
        self._kafka = kafka
        self._sent_at = sent_at
        self.reported = LatencySeries()
        self.measured = LatencySeries()
        self.profile_stage = LatencySeries()
        self.stats = ProbeStats()
        self.latest: dict[str, dict[str, Any]] = {}
        self.recent_users: deque[str] = deque(maxlen=50)
        self.last_record_at = 0.0
        self.canaries = 0
        self._stop = threading.Event()
        self._consumer = make_consumer(kafka)
        self._assign_both()
        self._thread = threading.Thread(target=self._run, name="relata-probe", daemon=True)

    def _assign_both(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        partitions = []
        for spec in (RECOMMENDATIONS, PROFILE_UPDATES, DEAD_LETTER):
            topic = self._kafka.topic(spec.name)
            meta = self._consumer.list_topics(topic, timeout=10)
            partitions += [
                TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.topics[topic].partitions
            ]
        self._consumer.assign(partitions)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()

    def _run(self) -> None:
        rec_topic = self._kafka.topic(RECOMMENDATIONS.name)
        update_topic = self._kafka.topic(PROFILE_UPDATES.name)
        while not self._stop.is_set():
            # poll() returns as soon as one record is there (consume(n) waits for n or timeout).
            msg = self._consumer.poll(0.1)
            if msg is None or msg.error() is not None or msg.value() is None:
                continue
            now = time.time()
            self.last_record_at = now
            if msg.topic() == rec_topic:
                self._on_recommendation(msg.value(), now)
            elif msg.topic() == update_topic:
                self._on_profile_update(msg.value(), now)
            else:
                self._on_dead_letter(msg.value())

    @staticmethod
    def _parsed(raw: bytes | None, what: str) -> dict[str, Any] | None:
        try:
            record = None if raw is None else orjson.loads(raw)
        except orjson.JSONDecodeError:  # orjson also refuses deep nesting this way
            record = None
        if not isinstance(record, dict):
            logger.warning("unparsable %s", what)
            return None
        return record

    def _on_recommendation(self, raw: bytes, now: float) -> None:
        rec = self._parsed(raw, "recommendation on the output topic")
        if rec is None:
            return
        user = rec.get("user_id")
        if isinstance(user, str) and user.startswith(CANARY_PREFIX):
            self.canaries += 1
            return
        self.stats.recommendations += 1
        reported = rec.get("latency_ms")
        if isinstance(reported, int | float):
            self.reported.add(now, float(reported))
        first = self._first_sent(rec)
        if first is not None:
            self.measured.add(now, (now - first) * 1000)
        if isinstance(user, str):
            self.latest[user] = rec
            self.recent_users.append(user)

    def _first_sent(self, record: dict[str, Any]) -> float | None:
        ids = record.get("trigger_event_ids", [])
        sent = [self._sent_at[e] for e in ids if e in self._sent_at]
        return min(sent) if sent else None

    def _on_profile_update(self, raw: bytes, now: float) -> None:
        update = self._parsed(raw, "profile update")
        if update is None:
            return
        first = self._first_sent(update)
        if first is not None:
            self.profile_stage.add(now, (now - first) * 1000)

    def _on_dead_letter(self, raw: bytes) -> None:
        record = self._parsed(raw, "dead letter")
        error_type = "unknown" if record is None else str(record.get("error_type", "unknown"))
        self.stats.dead_letters[error_type] += 1


class LagMonitor:
    """Consumer-group lag (end offset − committed offset, summed over partitions).

    Committed offsets are read by a consumer per group that never joins it (OffsetFetch only).
    librdkafka's AdminClient group calls (list offsets / describe groups) crashed the process
    (SIGSEGV in rdk:main, librdkafka 2.16) while a group was coordinating; this path does not.

    A sample costs the broker one ListOffsets and one OffsetFetch request per topic: partitions
    are looked up once per topic (the pipeline's topics are created with their partitions), and
    the end offsets of all of a topic's partitions come in one request (`offsets_for_times` at
    OFFSET_END), not one watermark query per partition. Sampled every second, the per-partition
    queries and metadata lookups were ~30 broker requests a second, a fifth of the idle
    broker's.
    """

    def __init__(self, kafka: KafkaSettings) -> None:
        self._kafka = kafka
        self._consumer = make_consumer(kafka)
        self._group_consumers: dict[str, Any] = {}
        self._partition_ids: dict[str, list[int]] = {}

    def _partitions(self, topic: str) -> list[int]:
        found = self._partition_ids.get(topic)
        if found is None:
            meta = self._consumer.list_topics(topic, timeout=10)
            found = sorted(meta.topics[topic].partitions)
            if found:  # an unknown topic lists none: look again next time
                self._partition_ids[topic] = found
        return found

    def end_offsets(self, topic: str) -> dict[int, int]:
        from confluent_kafka import OFFSET_END, TopicPartition

        wanted = [TopicPartition(topic, p, OFFSET_END) for p in self._partitions(topic)]
        if not wanted:
            return {}
        return {
            tp.partition: tp.offset
            for tp in self._consumer.offsets_for_times(wanted, timeout=10)
            if tp.error is None and tp.offset >= 0
        }

    def committed(self, group: str, topic: str) -> dict[int, int]:
        from confluent_kafka import TopicPartition

        consumer = self._group_consumers.get(group)
        if consumer is None:
            consumer = make_consumer(self._kafka, group_id=group)
            self._group_consumers[group] = consumer
        wanted = [TopicPartition(topic, p) for p in self._partitions(topic)]
        return {
            tp.partition: tp.offset
            for tp in consumer.committed(wanted, timeout=10)
            if tp.offset >= 0
        }

    def lag(self, group: str, topic: str) -> int:
        ends = self.end_offsets(topic)
        done = self.committed(group, topic)
        return sum(max(0, end - done.get(p, 0)) for p, end in ends.items())

    def close(self) -> None:
        for consumer in [self._consumer, *self._group_consumers.values()]:
            with contextlib.suppress(Exception):
                consumer.close()


def scrape_metrics(url: str, *, timeout_s: float = 2.0) -> dict[str, float]:
    """Prometheus text exposition at `url` as {"name{labels}": value}; {} when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, TimeoutError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def live_quality(metrics: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """Per variant, from live quality's scraped metrics (`scrape_metrics`): actions judged,
    hits, hit rate and mean NDCG over the whole run (None before any action is judged)."""
    sums: dict[str, dict[str, float]] = {}
    names = {
        "relata_quality_events_judged_total": "judged",
        "relata_quality_hits_total": "hits",
        "relata_quality_ndcg_total": "ndcg_sum",
    }
    for series, value in metrics.items():
        name, _, labels = series.partition("{")
        field_name = names.get(name)
        found = re.search(r'variant="([^"]*)"', labels)
        if field_name is None or found is None:
            continue
        totals = sums.setdefault(found.group(1), dict.fromkeys(names.values(), 0.0))
        totals[field_name] += value
    out: dict[str, dict[str, float | None]] = {}
    for variant, totals in sorted(sums.items()):
        judged = totals["judged"]
        out[variant] = {
            "judged": judged,
            "hits": totals["hits"],
            "hit_rate": totals["hits"] / judged if judged else None,
            "ndcg": totals["ndcg_sum"] / judged if judged else None,
        }
    return out
