"""The freshness SLO of relata, shared by the dashboard and checked against the alert rules.

Freshness is event → recommendation: the oldest triggering event's Kafka timestamp to the
recommendation acknowledged by the broker (`relata_event_to_recommendation_seconds`).
"""

from __future__ import annotations

# 99 % of recommendations within 250 ms over 30 days: the p99 objective of the latency alert.
# The objective must be a bucket bound of the histogram (workers/metrics.py), or the share of
# fast recommendations cannot be read from it.
FRESHNESS_OBJECTIVE_SECONDS = 0.25
FRESHNESS_TARGET = 0.99
FRESHNESS_WINDOW = "30d"
METRIC = "relata_event_to_recommendation_seconds"


def freshness_bad_ratio(window: str) -> str:
    """PromQL: the share of recommendations slower than the objective over `window`."""
    return (
        f'1 - sum(rate({METRIC}_bucket{{le="{FRESHNESS_OBJECTIVE_SECONDS:g}"}}[{window}]))'
        f" / sum(rate({METRIC}_count[{window}]))"
    )
