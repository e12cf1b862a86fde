"""Live quality's consumer on a fake client: lists and events decoded, judged in order,
counted by variant, a re-delivered event counted once, and the committed offsets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry

from schemas.quality_settings import QualitySettings
from tests.unit.worker_fakes import FakeMessage
from workers.metrics import QualityMetrics
from workers.quality_monitor import QualityMonitor, QualityTopics

EVENTS, LIVE, SHADOW = "behavior-events", "recommendations", "recommendations-shadow"


@dataclass
class Client:
    """Three topics of one partition; each consume() hands out what was added since."""

    queue: list[FakeMessage] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)
    commits: list[dict[tuple[str, int], int]] = field(default_factory=list)

    def add(self, topic: str, value: Any, key: str, ts_ms: int) -> None:
        offset = self.offsets.get(topic, 0)
        self.offsets[topic] = offset + 1
        raw = value if value is None or isinstance(value, bytes) else json.dumps(value).encode()
        self.queue.append(FakeMessage(topic, raw, key.encode(), _offset=offset, _ts_ms=ts_ms))

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        out, self.queue = self.queue[:num_messages], self.queue[num_messages:]
        return out

    def commit(self, *, offsets: Sequence[Any], asynchronous: bool = True) -> None:
        self.commits.append({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def get_watermark_offsets(self, tp: Any, cached: bool = False) -> tuple[int, int]:
        return 0, self.offsets.get(tp.topic, 0)


_TRENDING = {"source_item_id": None, "kind": "trending", "strength": 1.0, "text": "trending"}


def _recommendation(user: str, items: list[str], trigger: str) -> dict[str, Any]:
    return {
        "user_id": user,
        "items": [{"item_id": i, "score": 1.0, "reasons": [_TRENDING]} for i in items],
        "generated_at": datetime.now(UTC).isoformat(),
        "model_name": "m",
        "model_version": "v",
        "strategy": "hybrid/pooled",
        "trigger_event_ids": [trigger],
        "latency_ms": 1.0,
    }


def _event(event_id: str, user: str, item: str, event_type: str = "purchase") -> dict[str, Any]:
    ts = "2011-01-01T00:00:00Z"
    return {
        "event_id": event_id,
        "user_id": user,
        "item_id": item,
        "event_type": event_type,
        "ts": ts,
    }


def _monitor(client: Client, *, delay_ms: float = 0.0) -> tuple[QualityMonitor, CollectorRegistry]:
    registry = CollectorRegistry()
    monitor = QualityMonitor(
        consumer=client,
        metrics=QualityMetrics.create(registry),
        topics=QualityTopics(events=EVENTS, lists={"live": LIVE, "shadow": SHADOW}),
        settings=QualitySettings(judge_delay_ms=delay_ms, commit_interval_ms=0),
        clock=lambda: 10.0,
    )
    # As after an assignment from the start of every topic.
    monitor._list_positions = {(LIVE, 0): 0, (SHADOW, 0): 0}
    return monitor, registry


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_hits_and_misses_are_counted_by_variant_and_a_redelivery_once() -> None:
    client = Client()
    monitor, registry = _monitor(client)
    client.add(LIVE, _recommendation("u1", ["a", "b", "c"], "t1"), "u1", 1_000)
    client.add(SHADOW, _recommendation("u1", ["x", "b"], "t1"), "u1", 1_000)
    client.add(EVENTS, _event("e1", "u1", "b"), "u1", 2_000)  # rank 2 live, 2 shadow
    client.add(EVENTS, _event("e2", "u1", "c"), "u1", 2_100)  # rank 3 live, miss shadow
    client.add(EVENTS, _event("v1", "u1", "a", "view"), "u1", 2_200)  # not judged
    client.add(EVENTS, _event("e1", "u1", "b"), "u1", 2_000)  # re-delivered: once
    client.add(EVENTS, _event("e3", "u9", "b"), "u9", 2_300)  # no list
    client.add(EVENTS, b"not json", "u1", 2_400)  # dead-lettered upstream
    monitor.poll_once()

    judged = "relata_quality_events_judged_total"
    purchase = {"event_type": "purchase"}
    assert _value(registry, judged, variant="live", **purchase) == 2
    assert _value(registry, judged, variant="shadow", **purchase) == 2
    assert _value(registry, "relata_quality_hits_total", variant="live", **purchase) == 2
    assert _value(registry, "relata_quality_hits_total", variant="shadow", **purchase) == 1
    ndcg = _value(registry, "relata_quality_ndcg_total", variant="live", **purchase)
    assert abs(ndcg - (1 / 1.5849625 + 0.5)) < 1e-6  # ranks 2 and 3
    assert _value(registry, "relata_quality_duplicates_total") == 1
    unjudged = "relata_quality_events_unjudged_total"
    assert _value(registry, unjudged, variant="live", reason="no_list") == 1
    assert _value(registry, "relata_quality_lists_total", variant="shadow") == 1
    assert _value(registry, "relata_quality_users") == 1
    assert client.commits[-1] == {(EVENTS, 0): 6}


def test_an_event_read_before_the_lists_of_its_time_waits_for_them() -> None:
    client = Client()
    monitor, registry = _monitor(client, delay_ms=60_000)
    client.add(LIVE, _recommendation("u1", ["a"], "t1"), "u1", 1_000)
    client.add(SHADOW, _recommendation("u1", ["a"], "t1"), "u1", 1_000)
    client.add(EVENTS, _event("e1", "u1", "b"), "u1", 3_000)
    monitor.poll_once()
    assert (
        _value(
            registry, "relata_quality_events_judged_total", variant="live", event_type="purchase"
        )
        == 0
    )
    assert client.commits[-1] == {(EVENTS, 0): 0}  # not past the waiting event
    # The list the user had at 3 s was published at 2 s; read now, then a later one.
    client.add(LIVE, _recommendation("u1", ["b"], "t2"), "u1", 2_000)
    client.add(LIVE, _recommendation("u1", ["c"], "e1"), "u1", 3_050)
    client.add(SHADOW, _recommendation("u1", ["c"], "e1"), "u1", 3_050)
    monitor.poll_once()
    assert _value(registry, "relata_quality_hits_total", variant="live", event_type="purchase") == 1
    assert (
        _value(registry, "relata_quality_hits_total", variant="shadow", event_type="purchase") == 0
    )
    assert client.commits[-1] == {(EVENTS, 0): 1}


def test_a_tombstone_forgets_the_users_list() -> None:
    client = Client()
    monitor, registry = _monitor(client)
    client.add(LIVE, _recommendation("u1", ["a"], "t1"), "u1", 1_000)
    client.add(LIVE, None, "u1", 1_500)
    client.add(SHADOW, None, "u1", 1_500)
    client.add(EVENTS, _event("e1", "u1", "a"), "u1", 2_000)
    monitor.poll_once()
    unjudged = "relata_quality_events_unjudged_total"
    assert _value(registry, unjudged, variant="live", reason="no_list") == 1
    assert _value(registry, "relata_quality_users") == 0
