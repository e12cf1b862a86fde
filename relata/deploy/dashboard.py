"""The Grafana dashboard, built as code with grafana-foundation-sdk.

Every query uses only the metrics `streams/metrics.py` and `workers/metrics.py` export
(tests/unit/test_deploy.py checks it). The top row is the freshness SLO: the p99 of
event → recommendation against its objective, and what is left of the error budget. The live
quality row compares the live and the shadow recommender on the same traffic.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import GraphTresholdsStyleMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef, Threshold, ThresholdsMode

from relata.deploy.slo import (
    FRESHNESS_OBJECTIVE_SECONDS,
    FRESHNESS_TARGET,
    FRESHNESS_WINDOW,
    freshness_bad_ratio,
)

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "[$__rate_interval]"


def _query(expr: str, legend: str | None = None) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).datasource(DATASOURCE)
    return query.legend_format(legend) if legend else query


def _quantile(q: float, metric: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{RATE})))"


def _sum_rate(metric: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping}(rate({metric}{RATE}))"


def _mean(metric: str) -> str:
    return f"sum(rate({metric}_sum{RATE})) / sum(rate({metric}_count{RATE}))"


def _thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return (
        ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=value, color=color) for value, color in steps])
    )


def _stat(title: str, unit: str, *queries: prometheus.Dataquery) -> stat.Panel:
    panel = stat.Panel().title(title).unit(unit).height(4).span(6).datasource(DATASOURCE)
    for ref, query in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(query.ref_id(ref))
    return panel


def _series(
    title: str, unit: str, *queries: prometheus.Dataquery, span: int = 8
) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).height(8).span(span).datasource(DATASOURCE)
    for ref, query in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(query.ref_id(ref))
    return panel


def _slo_panels() -> list[Any]:
    e2r = "relata_event_to_recommendation_seconds"
    objective = _thresholds((None, "green"), (FRESHNESS_OBJECTIVE_SECONDS, "red"))
    allowed = 1 - FRESHNESS_TARGET
    budget = f"1 - ({freshness_bad_ratio(FRESHNESS_WINDOW)}) / {allowed:g}"
    return [
        _stat(
            f"p99 event → recommendation (objective {FRESHNESS_OBJECTIVE_SECONDS * 1000:g} ms)",
            "s",
            _query(_quantile(0.99, e2r)),
        )
        .thresholds(objective)
        .description(
            f"SLO: {FRESHNESS_TARGET:.0%} of recommendations published within "
            f"{FRESHNESS_OBJECTIVE_SECONDS * 1000:g} ms of their triggering event, over "
            f"{FRESHNESS_WINDOW}."
        ),
        _stat(f"Error budget left ({FRESHNESS_WINDOW})", "percentunit", _query(budget))
        .thresholds(_thresholds((None, "red"), (0.25, "orange"), (0.5, "green")))
        .description("Share of the window's allowance of slow recommendations still unspent."),
        _series(
            "p99 event → recommendation against the objective",
            "s",
            _query(_quantile(0.99, e2r), "p99"),
            span=6,
        )
        .thresholds(objective)
        .thresholds_style(GraphThresholdsStyleConfig().mode(GraphTresholdsStyleMode.LINE)),
        _series(
            "Error budget burn rate (1 = spends it exactly in the window)",
            "short",
            _query(f"({freshness_bad_ratio('1h')}) / {allowed:g}", "1 h"),
            _query(f"({freshness_bad_ratio('6h')}) / {allowed:g}", "6 h"),
            span=6,
        ),
    ]


# Live quality is a ratio of sparse counts (a shopper acts on a list minutes after it): a range
# this long smooths it; PromQL gives the same ratio over any other.
QUALITY_RANGE = "15m"


def _ratio(numerator: str, denominator: str, by: str = "variant") -> str:
    return (
        f"sum by ({by}) (rate({numerator}[{QUALITY_RANGE}])) "
        f"/ sum by ({by}) (rate({denominator}[{QUALITY_RANGE}]))"
    )


def _quality_panels() -> list[Any]:
    judged = "relata_quality_events_judged_total"
    return [
        _series(
            f"Hit rate by variant ({QUALITY_RANGE})",
            "percentunit",
            _query(_ratio("relata_quality_hits_total", judged), "{{variant}}"),
        ).description(
            "Share of clicks, add-to-carts and purchases whose item was in the list the user "
            "had then (published at most RELATA_QUALITY_WINDOW_S before). Compare the shadow "
            "with live before switching it on."
        ),
        _series(
            f"Mean NDCG by variant ({QUALITY_RANGE})",
            "short",
            _query(_ratio("relata_quality_ndcg_total", judged), "{{variant}}"),
        ).description("1/log2(rank+1) per hit, 0 per miss, averaged over judged actions."),
        _series(
            "Judged and unjudged actions/s",
            "ops",
            _query(_sum_rate(judged, "variant, event_type"), "{{variant}} {{event_type}}"),
            _query(
                _sum_rate("relata_quality_events_unjudged_total", "variant, reason"),
                "{{variant}} not judged: {{reason}}",
            ),
        ),
    ]


def build() -> Dashboard:
    """The relata dashboard: the freshness SLO, then input and streams, the recommender, live
    quality, the encoder and indexer."""
    e2r = "relata_event_to_recommendation_seconds"
    rows: list[tuple[str, list[Any]]] = [
        ("Freshness SLO", _slo_panels()),
        (
            "Overview",
            [
                _stat("Events/s", "ops", _query(_sum_rate("relata_events_consumed_total"))),
                _stat(
                    "Recommendations/s",
                    "ops",
                    _query(_sum_rate("relata_recommendations_published_total")),
                ),
                _stat("p50 event → recommendation", "s", _query(_quantile(0.5, e2r))),
                _stat("Dead letters/s", "ops", _query(_sum_rate("relata_dead_letter_total"))),
            ],
        ),
        (
            "Input and streams",
            [
                _series(
                    "Events/s by type",
                    "ops",
                    _query(
                        _sum_rate("relata_events_consumed_total", "event_type"), "{{event_type}}"
                    ),
                    _query(_sum_rate("relata_events_duplicate_total"), "duplicates (skipped)"),
                ),
                _series(
                    "Dead letters/s by error type",
                    "ops",
                    _query(
                        _sum_rate("relata_dead_letter_total", "stage, error_type"),
                        "{{stage}} {{error_type}}",
                    ),
                ),
                _series(
                    "Event processing (profile agent)",
                    "s",
                    _query(_quantile(0.5, "relata_event_processing_seconds"), "p50"),
                    _query(_quantile(0.99, "relata_event_processing_seconds"), "p99"),
                ),
                _series(
                    "Profile updates and association updates/s",
                    "ops",
                    _query(_sum_rate("relata_profile_updates_total"), "profile updates"),
                    _query(_sum_rate("relata_association_updates_total"), "association updates"),
                    _query(
                        _sum_rate("relata_related_items_published_total"),
                        "related-items published",
                    ),
                ),
                _series(
                    "Association items",
                    "short",
                    _query("sum(relata_association_items)", "items with association state"),
                ),
                _series(
                    "HTTP requests/s",
                    "reqps",
                    _query(
                        _sum_rate("relata_http_requests_total", "endpoint, status"),
                        "{{endpoint}} {{status}}",
                    ),
                ),
            ],
        ),
        (
            "Recommender",
            [
                _series(
                    "Event → recommendation latency",
                    "s",
                    *(_query(_quantile(q, e2r), f"p{q * 100:g}") for q in (0.5, 0.95, 0.99)),
                    span=12,
                ),
                _series(
                    "Recommendations/s",
                    "ops",
                    _query(_sum_rate("relata_recommendations_published_total"), "published"),
                    _query(
                        _sum_rate("relata_profile_updates_coalesced_total"),
                        "profile updates coalesced",
                    ),
                    span=12,
                ),
                _series(
                    "Recommender batch size",
                    "short",
                    _query(_quantile(0.5, "relata_recommender_batch_size"), "p50"),
                    _query(_quantile(0.95, "relata_recommender_batch_size"), "p95"),
                    _query(_mean("relata_recommender_batch_size"), "mean"),
                ),
                _series(
                    "Qdrant query seconds",
                    "s",
                    _query(_quantile(0.5, "relata_qdrant_query_seconds"), "p50"),
                    _query(_quantile(0.99, "relata_qdrant_query_seconds"), "p99"),
                ),
                _series(
                    "Consumer lag (records)",
                    "short",
                    _query("sum by (topic) (relata_consumer_lag_records)", "{{topic}}"),
                ),
            ],
        ),
        ("Live quality (live and shadow)", _quality_panels()),
        (
            # Fits are minutes apart: counted per hour, the last scores shown as they stand.
            "Background fitting",
            [
                _series(
                    "Refits per hour by outcome",
                    "short",
                    _query("sum by (outcome) (increase(relata_fits_total[1h]))", "{{outcome}}"),
                ),
                _series(
                    "Validation NDCG@k of the last fit",
                    "short",
                    _query("max by (model) (relata_fit_validation_ndcg)", "{{model}}"),
                ),
                _series(
                    "Fit duration (mean over 6 h) and histories recorded",
                    "short",
                    _query(
                        "sum(increase(relata_fit_duration_seconds_sum[6h])) / "
                        "sum(increase(relata_fit_duration_seconds_count[6h]))",
                        "seconds per fit",
                    ),
                    _query("sum(relata_fit_histories)", "histories"),
                ),
            ],
        ),
        (
            "Encoder and indexer",
            [
                _series(
                    "Encode batch size",
                    "short",
                    _query(_quantile(0.5, "relata_encode_batch_size"), "p50"),
                    _query(_quantile(0.95, "relata_encode_batch_size"), "p95"),
                    _query(_mean("relata_encode_batch_size"), "mean"),
                ),
                _series(
                    "Encode seconds per batch",
                    "s",
                    _query(_quantile(0.5, "relata_encode_seconds"), "p50"),
                    _query(_quantile(0.99, "relata_encode_seconds"), "p99"),
                ),
                _series(
                    "Texts encoded and items indexed/s",
                    "ops",
                    _query(_sum_rate("relata_encoded_texts_total"), "texts encoded"),
                    _query(_sum_rate("relata_items_indexed_total"), "items indexed"),
                    _query(_sum_rate("relata_items_retired_total"), "items retired"),
                ),
            ],
        ),
    ]
    dashboard = (
        Dashboard("relata")
        .uid("relata-overview")
        .description("relata: events in, explained recommendations out.")
        .tags(["relata", "kafka", "recommendations"])
        .timezone("browser")
        .editable()
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
    )
    panel_id = 0
    for title, panels in rows:
        panel_id += 1
        dashboard = dashboard.with_row(Row(title).id(panel_id))
        for panel in panels:
            panel_id += 1
            dashboard = dashboard.with_panel(panel.id(panel_id))
    return dashboard


def dashboard_json() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (plain dicts and lists)."""
    encoded: dict[str, Any] = json.loads(json.dumps(build().build(), cls=JSONEncoder))
    return encoded
