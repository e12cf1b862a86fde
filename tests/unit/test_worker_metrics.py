"""Worker metrics carry exactly the names of docs/operations.md "Metric names"."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from workers.metrics import QualityMetrics, WorkerMetrics

DOCUMENTED_NAMES = {
    "relata_encode_batch_size",
    "relata_encode_seconds",
    "relata_encoded_texts_total",
    "relata_user_encoder_seconds",
    "relata_items_indexed_total",
    "relata_items_retired_total",
    "relata_qdrant_query_seconds",
    "relata_recommender_batch_size",
    "relata_profile_updates_coalesced_total",
    "relata_recommendations_published_total",
    "relata_event_to_recommendation_seconds",
    "relata_dead_letter_total",
    "relata_consumer_lag_records",
    "relata_fits_total",
    "relata_fit_duration_seconds",
    "relata_fit_validation_ndcg",
    "relata_fit_histories",
    "relata_rule_fallbacks_total",
}


QUALITY_NAMES = {
    "relata_quality_events_judged_total",
    "relata_quality_hits_total",
    "relata_quality_ndcg_total",
    "relata_quality_hit_rank",
    "relata_quality_events_unjudged_total",
    "relata_quality_duplicates_total",
    "relata_quality_lists_total",
    "relata_quality_users",
    "relata_consumer_lag_records",
}


def _exported(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        for sample in family.samples:
            name = sample.name
            for suffix in ("_bucket", "_sum", "_count", "_created"):
                if family.type == "histogram" and name.endswith(suffix):
                    name = name[: -len(suffix)]
            if not name.endswith("_created"):
                names.add(name)
    return names


def test_names_match_the_documented_names() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics.create(registry)
    metrics.dead_letter.labels(stage="recommender", error_type="invalid_fields").inc()
    metrics.consumer_lag.labels(topic="profile-updates").set(3)
    metrics.fits.labels(outcome="kept").inc()
    metrics.fit_validation_ndcg.labels(model="current").set(0.07)
    assert _exported(registry) == DOCUMENTED_NAMES


def test_latency_histogram_spans_1ms_to_10s() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics.create(registry)
    metrics.event_to_recommendation_seconds.observe(0.004)
    bounds = [
        float(sample.labels["le"])
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "relata_event_to_recommendation_seconds_bucket"
        and sample.labels["le"] != "+Inf"
    ]
    assert min(bounds) == 0.001
    assert max(bounds) == 10.0


def test_quality_names_match_the_documented_names() -> None:
    registry = CollectorRegistry()
    metrics = QualityMetrics.create(registry)
    labels = {"variant": "live", "event_type": "purchase"}
    for counter in (metrics.judged, metrics.hits, metrics.ndcg):
        counter.labels(**labels).inc()
    metrics.hit_rank.labels(variant="live").observe(3)
    metrics.unjudged.labels(variant="shadow", reason="no_list").inc()
    metrics.lists.labels(variant="live").inc()
    metrics.consumer_lag.labels(topic="behavior-events").set(0)
    assert _exported(registry) == QUALITY_NAMES
