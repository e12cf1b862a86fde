"""Prometheus metrics of the encoder workers, built from a registry the caller owns.

Names follow docs/operations.md "Metric names"; dashboards and alerts use only these.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Texts per forward pass group (one encode call): single items up to a full catalog batch.
ENCODE_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# One encode call: a few ms for a title on CPU up to tens of seconds for a large batch.
ENCODE_SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
# One store query (single or batched): edge answers in ~0.2-2 ms, a remote server in ms.
QUERY_SECONDS_BUCKETS = (
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
    1,
)
# The `stage` of `relata_rule_fallbacks_total` here: the business rules file's filters.
RULES_STAGE = "business_rules"
# Profile updates per recommender micro-batch.
RECOMMENDER_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# The headline latency, oldest triggering event's Kafka timestamp -> publish: 1 ms to 10 s.
EVENT_TO_RECOMMENDATION_BUCKETS = (
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
    10.0,
)

# One background fit: seconds on a small record of histories, minutes on a large one.
FIT_SECONDS_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)


def consumer_lag_gauge(registry: CollectorRegistry) -> Gauge:
    """The consumer-lag gauge every worker consumer reports to (`kafkaio.consumer.LagReporter`)."""
    return Gauge(
        "relata_consumer_lag_records",
        "Records between the consumer's position and the high watermark, by topic.",
        ["topic"],
        registry=registry,
    )


@dataclass(frozen=True, slots=True)
class WorkerMetrics:
    """Every metric the worker processes (indexer, recommender) export."""

    encode_batch_size: Histogram
    encode_seconds: Histogram
    encoded_texts: Counter
    user_encoder_seconds: Histogram
    items_indexed: Counter
    items_retired: Counter
    qdrant_query_seconds: Histogram
    recommender_batch_size: Histogram
    profile_updates_coalesced: Counter
    recommendations_published: Counter
    event_to_recommendation_seconds: Histogram
    dead_letter: Counter
    consumer_lag: Gauge
    rule_fallbacks: Counter
    fits: Counter
    fit_seconds: Histogram
    fit_validation_ndcg: Gauge
    fit_histories: Gauge

    def observe_encode(self, texts: int, seconds: float) -> None:
        """Record one encode call of `texts` texts."""
        self.encode_batch_size.observe(texts)
        self.encode_seconds.observe(seconds)
        self.encoded_texts.inc(texts)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> WorkerMetrics:
        """Register all worker metrics in `registry` (one call per registry)."""
        metrics = cls(
            encode_batch_size=Histogram(
                "relata_encode_batch_size",
                "Texts per encode call.",
                buckets=ENCODE_BATCH_BUCKETS,
                registry=registry,
            ),
            encode_seconds=Histogram(
                "relata_encode_seconds",
                "Wall time of one encode call.",
                buckets=ENCODE_SECONDS_BUCKETS,
                registry=registry,
            ),
            encoded_texts=Counter(
                "relata_encoded_texts_total", "Texts encoded.", registry=registry
            ),
            user_encoder_seconds=Histogram(
                "relata_user_encoder_seconds",
                "Wall time of the sequence user encoder over one micro-batch's histories.",
                buckets=ENCODE_SECONDS_BUCKETS,
                registry=registry,
            ),
            items_indexed=Counter(
                "relata_items_indexed_total",
                "Catalog items encoded and upserted into the vector store.",
                registry=registry,
            ),
            items_retired=Counter(
                "relata_items_retired_total",
                "Catalog items marked unavailable (tombstone or available=false).",
                registry=registry,
            ),
            qdrant_query_seconds=Histogram(
                "relata_qdrant_query_seconds",
                "Wall time of one vector-store query call (single or batched).",
                buckets=QUERY_SECONDS_BUCKETS,
                registry=registry,
            ),
            recommender_batch_size=Histogram(
                "relata_recommender_batch_size",
                "Profile updates per recommender micro-batch, before coalescing.",
                buckets=RECOMMENDER_BATCH_BUCKETS,
                registry=registry,
            ),
            profile_updates_coalesced=Counter(
                "relata_profile_updates_coalesced_total",
                "Profile updates folded into a later update of the same user in one batch.",
                registry=registry,
            ),
            recommendations_published=Counter(
                "relata_recommendations_published_total",
                "Recommendation records published.",
                registry=registry,
            ),
            event_to_recommendation_seconds=Histogram(
                "relata_event_to_recommendation_seconds",
                "Oldest triggering event's Kafka timestamp to the recommendation acknowledged by the broker.",
                buckets=EVENT_TO_RECOMMENDATION_BUCKETS,
                registry=registry,
            ),
            dead_letter=Counter(
                "relata_dead_letter_total",
                "Inputs sent to the dead-letter topic, by stage and error type.",
                ["stage", "error_type"],
                registry=registry,
            ),
            consumer_lag=consumer_lag_gauge(registry),
            rule_fallbacks=Counter(
                "relata_rule_fallbacks_total",
                "Lists whose filters removed every candidate, so were not applied (the list is "
                "ranked without them), by stage.",
                ["stage"],
                registry=registry,
            ),
            fits=Counter(
                "relata_fits_total",
                "Background fits of the ranking model, by outcome (swapped, kept, failed).",
                ["outcome"],
                registry=registry,
            ),
            fit_seconds=Histogram(
                "relata_fit_duration_seconds",
                "Wall time of one background fit, validation included.",
                buckets=FIT_SECONDS_BUCKETS,
                registry=registry,
            ),
            fit_validation_ndcg=Gauge(
                "relata_fit_validation_ndcg",
                "Validation NDCG@k of the last fit's candidate and of the model serving then.",
                ["model"],
                registry=registry,
            ),
            fit_histories=Gauge(
                "relata_fit_histories",
                "User histories recorded for the background fit.",
                registry=registry,
            ),
        )
        # Exported at 0 from the start, so a rate over it is defined before the first one.
        metrics.rule_fallbacks.labels(RULES_STAGE)
        return metrics


# Rank of a hit in its list (1 first): hits at rank <= k over judged actions is hit rate@k.
HIT_RANK_BUCKETS = (1, 2, 3, 5, 10, 20, 50, 100, 200)


@dataclass(frozen=True, slots=True)
class QualityMetrics:
    """Every metric of live quality (`relata workers --role quality`), by variant (`live`,
    `shadow`): actions judged against the list their user had, hits, and summed NDCG, so that
    PromQL divides them over any range."""

    judged: Counter
    hits: Counter
    ndcg: Counter
    hit_rank: Histogram
    unjudged: Counter
    duplicates: Counter
    lists: Counter
    users: Gauge
    consumer_lag: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> QualityMetrics:
        """Register all live-quality metrics in `registry` (one call per registry)."""
        by_type = ["variant", "event_type"]
        return cls(
            judged=Counter(
                "relata_quality_events_judged_total",
                "Actions (click, add to cart, purchase) judged against the list their user had.",
                by_type,
                registry=registry,
            ),
            hits=Counter(
                "relata_quality_hits_total",
                "Judged actions whose item was in the list.",
                by_type,
                registry=registry,
            ),
            ndcg=Counter(
                "relata_quality_ndcg_total",
                "Sum of the judged actions' NDCG (1/log2(rank+1) for a hit, 0 for a miss).",
                by_type,
                registry=registry,
            ),
            hit_rank=Histogram(
                "relata_quality_hit_rank",
                "Rank of the item in the list (1 first), for hits.",
                ["variant"],
                buckets=HIT_RANK_BUCKETS,
                registry=registry,
            ),
            unjudged=Counter(
                "relata_quality_events_unjudged_total",
                "Actions not judged: no list of their user (no_list) or one past the window (expired).",
                ["variant", "reason"],
                registry=registry,
            ),
            duplicates=Counter(
                "relata_quality_duplicates_total",
                "Re-delivered events skipped by event_id (judged once).",
                registry=registry,
            ),
            lists=Counter(
                "relata_quality_lists_total",
                "Published lists read, by variant.",
                ["variant"],
                registry=registry,
            ),
            users=Gauge(
                "relata_quality_users",
                "Users whose latest lists are kept (bounded by RELATA_QUALITY_MAX_USERS).",
                registry=registry,
            ),
            consumer_lag=consumer_lag_gauge(registry),
        )
