"""Prometheus metrics of the stream processor, built from a registry the caller owns.

Names follow docs/operations.md "Metric names"; dashboards and alerts use only these.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A batch of the profile agent: decode + fold + sends + the broker's acknowledgement; one event
# takes ~0.3 ms, a full batch tens of milliseconds, a stall seconds.
EVENT_SECONDS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

# The `stage` of `relata_rule_fallbacks_total` here: an HTTP request's filters.
REQUEST_STAGE = "request_filters"

BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass(frozen=True, slots=True)
class StreamsMetrics:
    """Every metric the streams process exports."""

    events_consumed: Counter
    events_duplicate: Counter
    erasures: Counter
    dead_letter: Counter
    profile_updates: Counter
    event_processing_seconds: Histogram
    event_batch_size: Histogram
    association_updates: Counter
    related_items_published: Counter
    association_items: Gauge
    http_requests: Counter
    consumer_lag: Gauge
    profiles_restored: Counter
    rule_fallbacks: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> StreamsMetrics:
        """Register all streams metrics in `registry` (one call per registry)."""
        metrics = cls(
            events_consumed=Counter(
                "relata_events_consumed_total",
                "Valid behaviour events consumed, by event type.",
                ["event_type"],
                registry=registry,
            ),
            events_duplicate=Counter(
                "relata_events_duplicate_total",
                "Re-delivered events skipped by event_id de-duplication.",
                registry=registry,
            ),
            erasures=Counter(
                "relata_erasures_total",
                "Users erased on request (their profile, recommendations and outputs).",
                registry=registry,
            ),
            dead_letter=Counter(
                "relata_dead_letter_total",
                "Inputs sent to the dead-letter topic, by stage and error type.",
                ["stage", "error_type"],
                registry=registry,
            ),
            profile_updates=Counter(
                "relata_profile_updates_total",
                "ProfileUpdate records published.",
                registry=registry,
            ),
            event_processing_seconds=Histogram(
                "relata_event_processing_seconds",
                "Time to process one batch of behaviour events in the profile agent, "
                "outputs acknowledged.",
                buckets=EVENT_SECONDS_BUCKETS,
                registry=registry,
            ),
            event_batch_size=Histogram(
                "relata_event_batch_size",
                "Behaviour events per batch of the profile agent (grows with the backlog).",
                buckets=BATCH_SIZE_BUCKETS,
                registry=registry,
            ),
            association_updates=Counter(
                "relata_association_updates_total",
                "Association inputs folded into the per-item statistics.",
                registry=registry,
            ),
            related_items_published=Counter(
                "relata_related_items_published_total",
                "RelatedItems records published after a material change.",
                registry=registry,
            ),
            association_items=Gauge(
                "relata_association_items",
                "Items with association state in this worker.",
                registry=registry,
            ),
            http_requests=Counter(
                "relata_http_requests_total",
                "HTTP requests served, by endpoint and status code.",
                ["endpoint", "status"],
                registry=registry,
            ),
            consumer_lag=Gauge(
                "relata_consumer_lag_records",
                "Records between the consumer's position and the high watermark, by topic "
                "(the profile agent's behavior-events).",
                ["topic"],
                registry=registry,
            ),
            profiles_restored=Counter(
                "relata_profiles_restored_total",
                "Changelog records replayed into the profiles table on partition assignment.",
                registry=registry,
            ),
            rule_fallbacks=Counter(
                "relata_rule_fallbacks_total",
                "Answers whose filters removed every candidate, so were not applied (the list "
                "is ranked without them), by stage.",
                ["stage"],
                registry=registry,
            ),
        )
        # Exported at 0 from the start, so a rate over it is defined before the first one.
        metrics.rule_fallbacks.labels(REQUEST_STAGE)
        return metrics
