"""`relata workers`: the composition root of the item indexer and the recommender.

Reads settings, creates topics, builds the Kafka clients, the encoder and the vector store,
serves Prometheus `/metrics` and the probes `/readyz` and `/livez` on one port, and runs the
loops until SIGTERM/SIGINT (ending within `RELATA_SHUTDOWN_GRACE_S` even while the broker is
away). A broker outage is waited out: no loop gives up on it. With `--role all` both
loops share ONE encoder and ONE store in one process (two threads): an embedded qdrant-edge
directory can be open in one process only, so that is how the demo runs.

With `RELATA_SHADOW_ENABLED` the recommender's process (roles `recommender`, `all`) runs a
shadow recommender beside the live one: the same encoder and store, its own consumer group,
producer and related-items reader, the live settings with `RELATA_SHADOW_OVERRIDES`, publishing
to `recommendations-shadow` (role `shadow`: that loop alone, e.g. beside a Qdrant server).
`--role quality` is live quality (`workers.quality_monitor`): no model, no store.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import click
from prometheus_client import CollectorRegistry

from kafkaio.consumer import CommitRetry, renewing_consumer
from kafkaio.health import BrokerWatch, Health, LoopWatch
from kafkaio.producer import NEVER_TIME_OUT
from relata.cli.settings_cli import build_settings, settings_options
from relata.runtime.health_server import serve_probes
from relata.runtime.preflight import require_kafka
from relata.runtime.process import freeze_startup_heap, stop_on_signals
from relata.runtime.topics import TopicError, ensure_topics, topic_name
from schemas.access import Component, component_access, topics_of
from schemas.fit_settings import FitSettings
from schemas.quality_settings import QualitySettings, ShadowSettings
from schemas.settings import (
    EncoderSettings,
    IndexerSettings,
    KafkaSettings,
    RecommenderSettings,
    ReliabilitySettings,
    StoreSettings,
)
from schemas.topics import (
    BEHAVIOR_EVENTS,
    DEAD_LETTER,
    ITEM_CATALOG,
    PROFILE_UPDATES,
    RECOMMENDATIONS,
    RECOMMENDATIONS_SHADOW,
    RELATED_ITEMS,
    SIMILAR_ITEMS,
    TRENDING_ITEMS,
    TopicSpec,
)

logger = logging.getLogger(__name__)

Role = Literal["indexer", "recommender", "shadow", "quality", "all"]
# The principal (schemas.access) each role runs as: `all` needs both loops' ACLs; a shadow
# recommender is granted what the live one is.
COMPONENT_OF_ROLE: dict[Role, Component] = {
    "indexer": "indexer",
    "recommender": "recommender",
    "shadow": "recommender",
    "quality": "quality",
    "all": "workers",
}
# The dead-letter stage of a shadow recommender's rejections (the live one's is `recommender`).
SHADOW_STAGE = "recommender-shadow"


def build_consumer(
    kafka: KafkaSettings,
    *,
    group_id: str,
    client_id: str,
    low_latency: bool = False,
    commit_retry: CommitRetry | None = None,
    renew_after_s: float | None = None,
    reachable: Callable[[], bool] | None = None,
    extra: dict[str, Any] | None = None,
) -> Any:
    """A confluent-kafka consumer with manual commits (offsets committed after the work);
    `commit_retry` hears of commits that failed, to send them again; `renew_after_s`: rebuilt
    when its partitions stay lost that long while the brokers answer (`reachable()`, a check
    through another client; `RenewingConsumer`); `extra`: more librdkafka settings."""
    from confluent_kafka import Consumer

    config: dict[str, Any] = kafka.librdkafka_config(client_id) | {
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 1_000,
    }
    if commit_retry is not None:
        config["on_commit"] = commit_retry.on_commit
    if low_latency:
        # The broker answers a fetch as soon as one byte is there: the wait bounds only idle
        # polling (a few ms would keep the broker busy with nothing to do; librdkafka keeps
        # every partition in the fetch, so new data on any one ends the wait).
        config |= {"fetch.wait.max.ms": 500, "fetch.min.bytes": 1}
    config |= extra or {}
    if renew_after_s is not None:
        return renewing_consumer(config, renew_after_s=renew_after_s, reachable=reachable)
    return Consumer(config)


def build_producer(kafka: KafkaSettings, *, client_id: str) -> Any:
    """An idempotent producer with a 1 ms linger (latency first; batches still form) that
    never gives up on a record while the broker is away."""
    from confluent_kafka import Producer

    return Producer(
        kafka.librdkafka_producer_config(client_id)
        | {"linger.ms": 1, "enable.idempotence": True, "acks": "all", **NEVER_TIME_OUT}
    )


def subscribe_watched(consumer: Any, topic: str, watch: LoopWatch) -> None:
    """Subscribe to `topic`, telling `watch` when the partitions are lost (a session timed
    out) and when an assignment comes again (librdkafka rejoins by itself while polled)."""

    def assigned(_consumer: Any, _partitions: Any) -> None:
        watch.assigned()

    def lost(_consumer: Any, partitions: Any) -> None:
        logger.warning("partitions lost topic=%s count=%d", topic, len(partitions))
        if partitions:
            watch.lost()

    consumer.subscribe([topic], on_assign=assigned, on_lost=lost)


def build_related_consumer(kafka: KafkaSettings, *, group_prefix: str) -> Any:
    """Reads every partition of `related-items` from the beginning, in every instance.

    Assigned, never subscribed or committed: each instance needs the whole compacted topic.
    """
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    topic = topic_name(kafka, RELATED_ITEMS)
    consumer = build_consumer(
        kafka,
        group_id=f"{group_prefix}-related-{uuid.uuid4().hex[:8]}",
        client_id="relata-recommender-related",
    )
    metadata = consumer.list_topics(topic, timeout=30)
    partitions = sorted(metadata.topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    return consumer


def holds_partition(consumer: Any, partition: int) -> bool:
    """Whether the group consumer is assigned `partition` (of the one topic it reads) now."""
    return any(tp.partition == partition for tp in consumer.assignment())


@dataclass
class Workers:
    """The built loops and everything to close when they stop."""

    loops: list[tuple[str, Callable[[threading.Event], None]]]
    encoder: Any
    store: Any
    closers: list[Callable[[], Any]] = field(default_factory=list)
    health: Health = field(default_factory=Health)
    watches: dict[str, LoopWatch] = field(default_factory=dict)

    def run(self, stop_event: threading.Event) -> None:
        """Run each loop in its own thread until `stop_event`; a crashed loop stops them all.
        The brokers are checked for the probes meanwhile."""
        errors: list[BaseException] = []
        if self.health.broker is not None:
            self.health.broker.start(stop_event)

        def guard(name: str, loop: Callable[[threading.Event], None]) -> None:
            try:
                loop(stop_event)
            except BaseException as exc:
                logger.exception("worker loop crashed loop=%s", name)
                watch = self.watches.get(name)
                if watch is not None:
                    watch.failed(exc)
                errors.append(exc)
                stop_event.set()

        threads = [
            threading.Thread(target=guard, args=(name, loop), name=f"relata-{name}", daemon=True)
            for name, loop in self.loops
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():  # a timed join keeps the main thread responsive to signals
                thread.join(0.5)
        if errors:
            raise RuntimeError(f"worker loop failed: {errors[0]!r}") from errors[0]

    def close(self) -> None:
        """Close Kafka clients, then the store and the encoder; each error is logged."""
        closes = [getattr(self.store, "close", None), getattr(self.encoder, "close", None)]
        for close in [*self.closers, *closes]:
            if close is None:
                continue
            try:
                close()
            except Exception:
                logger.exception("error while closing")


def build_workers(
    role: Role,
    *,
    kafka: KafkaSettings,
    encoder_settings: EncoderSettings,
    store_settings: StoreSettings,
    indexer_settings: IndexerSettings,
    recommender_settings: RecommenderSettings,
    registry: CollectorRegistry,
    encoder: Any = None,
    store: Any = None,
    reliability: ReliabilitySettings | None = None,
    shadow: ShadowSettings | None = None,
    quality: QualitySettings | None = None,
    fit_settings: FitSettings | None = None,
) -> Workers:
    """Build the loops of `role`; one encoder and one store serve both loops of `all` (and a
    shadow recommender), one `Health` (their watches, the brokers) the probes; with the live
    recommender, its background fitter (a loop of its own) unless `fit_settings` turn it off."""
    reliability = reliability or ReliabilitySettings()
    shadow = shadow or ShadowSettings()
    if role == "quality":  # before the imports below: no torch in live quality's process
        return build_quality(
            kafka=kafka,
            settings=quality or QualitySettings(),
            with_shadow=shadow.enabled,
            registry=registry,
            reliability=reliability,
        )
    from workers.encoder import TransformerEncoder
    from workers.indexer import IndexerTopics, ItemIndexer
    from workers.metrics import WorkerMetrics
    from workers.model_identity import version_group
    from workers.store_versions import build_store
    from workers.vector_store import ModelIdentity

    encoder = encoder or TransformerEncoder.from_settings(encoder_settings)
    store = store or build_store(store_settings, encoder.dim, model=ModelIdentity.of(encoder))
    metrics = WorkerMetrics.create(registry)
    health = Health(
        ack_timeout_s=reliability.ack_timeout_s, stall_timeout_s=reliability.stall_timeout_s
    )
    workers = Workers(loops=[], encoder=encoder, store=store, health=health)
    dead_letter = topic_name(kafka, DEAD_LETTER)
    # A stop waits this long for the last acknowledgements, and so long for each client's
    # close, so that the whole stop fits the grace period.
    stop_share_s = reliability.shutdown_grace_s / 4
    if role in ("indexer", "all"):
        retry = CommitRetry()
        consumer = build_consumer(
            kafka,
            group_id=version_group(indexer_settings.group_id, encoder.version),
            client_id="relata-indexer",
            commit_retry=retry,
            renew_after_s=reliability.rejoin_timeout_s,
            reachable=health.brokers_answer,
        )
        watch = workers.watches["indexer"] = health.loop("indexer")
        subscribe_watched(consumer, topic_name(kafka, ITEM_CATALOG), watch)
        producer = build_producer(kafka, client_id="relata-indexer")
        indexer = ItemIndexer(
            consumer=consumer,
            producer=producer,
            encoder=encoder,
            store=store,
            metrics=metrics,
            topics=IndexerTopics(
                catalog=topic_name(kafka, ITEM_CATALOG),
                dead_letter=dead_letter,
                similar=topic_name(kafka, SIMILAR_ITEMS),
            ),
            max_batch=indexer_settings.max_batch,
            max_wait_ms=indexer_settings.max_wait_ms,
            watch=watch,
            ack_timeout_s=reliability.ack_timeout_s,
            commit_retry=retry,
            similar_k=indexer_settings.similar_k,
        )
        health.wait("indexer outputs", lambda: indexer.producer.waiting_since)
        workers.loops.append(("indexer", indexer.run))
        workers.closers += [consumer.close, partial(producer.flush, stop_share_s)]
    if role in ("recommender", "all"):
        producer = _add_recommender(
            workers,
            "recommender",
            kafka=kafka,
            settings=recommender_settings,
            topic=RECOMMENDATIONS,
            metrics=metrics,
            reliability=reliability,
            device=encoder_settings.device,
            fit_settings=fit_settings or FitSettings(),
        )
    if role == "shadow" or (shadow.enabled and role in ("recommender", "all")):
        # Its own metrics, never served: its batches, latency and published lists must not
        # count as the live recommender's (live quality labels its lists instead).
        producer = _add_recommender(
            workers,
            "shadow",
            kafka=kafka,
            settings=shadow.recommender(recommender_settings),
            topic=RECOMMENDATIONS_SHADOW,
            metrics=WorkerMetrics.create(CollectorRegistry()),
            reliability=reliability,
            device=encoder_settings.device,
            stage=SHADOW_STAGE,
        )
    health.broker = BrokerWatch(
        partial(producer.list_topics, topic_name(kafka, DEAD_LETTER)),
        interval_s=reliability.broker_check_interval_s,
    )
    return workers


def _add_recommender(
    workers: Workers,
    name: str,
    *,
    kafka: KafkaSettings,
    settings: RecommenderSettings,
    topic: TopicSpec,
    metrics: Any,
    reliability: ReliabilitySettings,
    device: str,
    stage: str | None = None,
    fit_settings: FitSettings | None = None,
) -> Any:
    """Add a recommender loop publishing to `topic` (the live one, or a shadow) on the
    workers' encoder and store, and its background fitter when `fit_settings` enable one (the
    live recommender's); returns its producer."""
    from workers.fitting.history_log import HistoryLog
    from workers.micro_batch import RecommenderTopics
    from workers.recommender import STAGE, Recommender

    stop_share_s = reliability.shutdown_grace_s / 4
    client_id = "relata-recommender" if name == "recommender" else f"relata-recommender-{name}"
    retry = CommitRetry()
    consumer = build_consumer(
        kafka,
        group_id=settings.group_id,
        client_id=client_id,
        low_latency=True,
        commit_retry=retry,
        renew_after_s=reliability.rejoin_timeout_s,
        reachable=workers.health.brokers_answer,
    )
    watch = workers.watches[name] = workers.health.loop(name)
    subscribe_watched(consumer, topic_name(kafka, PROFILE_UPDATES), watch)
    related = build_related_consumer(kafka, group_prefix=settings.group_id)
    producer = build_producer(kafka, client_id=client_id)
    fit = fit_settings or FitSettings(enabled=False)
    fitting = fit.enabled and settings.strategy == "hybrid"
    history_log = HistoryLog(fit.max_users) if fitting else None
    user_encoder = None
    if settings.user_encoder_path is not None:
        from workers.encoder import resolve_device
        from workers.user_encoder import load_user_encoder

        # On the transformer's device (GPU when present); torch's CPU threads are the
        # process's (RELATA_ENCODER_THREADS), shared with the transformer.
        user_encoder = load_user_encoder(settings.user_encoder_path, device=resolve_device(device))
    recommender = Recommender(
        consumer=consumer,
        related_consumer=related,
        producer=producer,
        encoder=workers.encoder,
        store=workers.store,
        metrics=metrics,
        topics=RecommenderTopics(
            profile_updates=topic_name(kafka, PROFILE_UPDATES),
            related_items=topic_name(kafka, RELATED_ITEMS),
            recommendations=topic_name(kafka, topic),
            dead_letter=topic_name(kafka, DEAD_LETTER),
            # Only the live recommender publishes the trending list (one producer per key).
            trending=topic_name(kafka, TRENDING_ITEMS) if topic is RECOMMENDATIONS else None,
        ),
        settings=settings,
        model=starting_model(settings, fit),
        watch=watch,
        ack_timeout_s=reliability.ack_timeout_s,
        stop_flush_s=stop_share_s,
        commit_retry=retry,
        stage=stage or STAGE,
        # One instance publishes the trending list: the one partition 0 is assigned to.
        leads=partial(holds_partition, consumer, 0),
        user_encoder=user_encoder,
        on_history=None if history_log is None else history_log.record,
    )
    workers.health.wait(f"{name} outputs", lambda: recommender.producer.waiting_since)
    workers.loops.append((name, recommender.run))
    workers.closers += [consumer.close, related.close, partial(producer.flush, stop_share_s)]
    if history_log is not None:
        refitter = build_refitter(
            recommender, history_log=history_log, settings=fit, metrics=metrics
        )
        workers.loops.append(("fitter", refitter.run))
    return producer


def build_quality(
    *,
    kafka: KafkaSettings,
    settings: QualitySettings,
    with_shadow: bool,
    registry: CollectorRegistry,
    reliability: ReliabilitySettings,
) -> Workers:
    """Live quality's loop (`workers.quality_monitor`): one consumer of the events and the
    lists, range-assigned so that it holds the same partitions of each."""
    from workers.metrics import QualityMetrics
    from workers.quality_monitor import LIVE, SHADOW, QualityMonitor, QualityTopics

    health = Health(
        ack_timeout_s=reliability.ack_timeout_s, stall_timeout_s=reliability.stall_timeout_s
    )
    workers = Workers(loops=[], encoder=None, store=None, health=health)
    lists = {LIVE: topic_name(kafka, RECOMMENDATIONS)}
    if with_shadow:
        lists[SHADOW] = topic_name(kafka, RECOMMENDATIONS_SHADOW)
    retry = CommitRetry()
    consumer = build_consumer(
        kafka,
        group_id=settings.group_id,
        client_id="relata-quality",
        commit_retry=retry,
        renew_after_s=reliability.rejoin_timeout_s,
        reachable=health.brokers_answer,
        # Range: the same partition numbers of every topic to one member (co-partitioning);
        # a new group's events start where its lists do (`QualityMonitor._assigned`).
        extra={"partition.assignment.strategy": "range", "auto.offset.reset": "latest"},
    )
    watch = workers.watches["quality"] = health.loop("quality")
    monitor = QualityMonitor(
        consumer=consumer,
        metrics=QualityMetrics.create(registry),
        topics=QualityTopics(events=topic_name(kafka, BEHAVIOR_EVENTS), lists=lists),
        settings=settings,
        watch=watch,
        commit_retry=retry,
    )
    monitor.subscribe()
    workers.loops.append(("quality", monitor.run))
    workers.closers.append(consumer.close)
    # Asked through a client of its own: the consumer's renewal trusts this watch, and a
    # wedged consumer's own metadata requests can fail while the brokers answer.
    from confluent_kafka.admin import AdminClient

    admin: Any = AdminClient(dict(kafka.librdkafka_config("relata-quality-watch")))
    health.broker = BrokerWatch(
        partial(admin.list_topics, lists[LIVE]),
        interval_s=reliability.broker_check_interval_s,
    )
    return workers


def starting_model(recommender: RecommenderSettings, fit: FitSettings) -> Any:
    """The model the recommender starts with: the background fitter's last winner when one
    is saved, else the blend weights artifact, else the built-in weights."""
    from workers.fitting import ModelBundle, load_bundle

    if fit.model_path is not None and fit.model_path.exists():
        logger.info("ranking model from the last fit path=%s", fit.model_path)
        return load_bundle(fit.model_path)
    if recommender.blend_path is not None:
        return load_bundle(recommender.blend_path)
    return ModelBundle()


def build_refitter(
    recommender: Any, *, history_log: Any, settings: FitSettings, metrics: Any
) -> Any:
    """The recommender's background fitter: its fits run in a child process, learning their
    evidence with the stream processor's fold (its `RELATA_STREAMS_*` settings: set them as
    the stream processor's)."""
    from relata.runtime.evidence import fold_evidence
    from schemas.settings import StreamsSettings
    from workers.fitting.refit import ProcessRunner, Refitter, store_items, user_encoder_step

    store = recommender.store
    return Refitter(
        log=history_log,
        settings=settings,
        current=lambda: recommender.model,
        swap=recommender.use_model,
        items=partial(store_items, store),
        evidence=partial(fold_evidence, settings=StreamsSettings()),
        metrics=metrics,
        runner=ProcessRunner(threads=settings.threads, nice=settings.nice),
        k=recommender.settings.k,
        candidates=recommender.settings.candidates,
        mmr_lambda=recommender.settings.mmr_lambda,
        user_encoder_step=user_encoder_step(settings),
    )


@click.command(name="workers")
@click.option(
    "--role",
    type=click.Choice(["indexer", "recommender", "shadow", "quality", "all"]),
    default="all",
    show_default=True,
    envvar="RELATA_WORKERS_ROLE",
    show_envvar=True,
    help=(
        "Which loops to run; `all` shares one encoder and one store (needed for edge); "
        "`shadow` only the shadow recommender; `quality` live quality (no model)."
    ),
)
@settings_options(QualitySettings, group="quality")
@settings_options(ShadowSettings, group="shadow")
@settings_options(ReliabilitySettings, group="reliability")
@settings_options(FitSettings, group="fit")
@settings_options(RecommenderSettings, group="recommender")
@settings_options(IndexerSettings, group="indexer")
@settings_options(StoreSettings, group="store")
@settings_options(EncoderSettings, group="encoder")
@settings_options(KafkaSettings, group="kafka")
def command(role: Role, **params: Any) -> None:
    """Run the item indexer, the recommender (and its shadow) or live quality until
    SIGTERM/SIGINT."""
    kafka = build_settings(KafkaSettings, group="kafka", params=params)
    encoder_settings = build_settings(EncoderSettings, group="encoder", params=params)
    store_settings = build_settings(StoreSettings, group="store", params=params)
    indexer_settings = build_settings(IndexerSettings, group="indexer", params=params)
    recommender_settings = build_settings(RecommenderSettings, group="recommender", params=params)
    reliability = build_settings(ReliabilitySettings, group="reliability", params=params)
    shadow = build_settings(ShadowSettings, group="shadow", params=params)
    quality = build_settings(QualitySettings, group="quality", params=params)
    fit_settings = build_settings(FitSettings, group="fit", params=params)

    access = component_access(
        kafka, indexer=indexer_settings, recommender=recommender_settings, quality=quality
    )[COMPONENT_OF_ROLE[role]]
    require_kafka(kafka, needs=access.topics())
    try:
        created = ensure_topics(kafka, topics_of(access, kafka))
    except TopicError as exc:
        raise click.ClickException(str(exc)) from exc
    logger.info("topics ready created=%s", ",".join(created) or "none")
    registry = CollectorRegistry()
    port = {"indexer": indexer_settings.metrics_port, "quality": quality.metrics_port}.get(
        role, recommender_settings.metrics_port
    )

    stop_event = threading.Event()
    stop_on_signals(stop_event, log=logger, grace_s=reliability.shutdown_grace_s)

    workers = build_workers(
        role,
        kafka=kafka,
        encoder_settings=encoder_settings,
        store_settings=store_settings,
        indexer_settings=indexer_settings,
        recommender_settings=recommender_settings,
        registry=registry,
        reliability=reliability,
        shadow=shadow,
        quality=quality,
        fit_settings=fit_settings,
    )
    # Once the model is loaded and the consumers built (the startup probe waits for it).
    server = serve_probes(port, registry=registry, health=workers.health) if port else None
    model = f"{workers.encoder.name}@{workers.encoder.version}" if workers.encoder else "none"
    click.echo(
        f"relata workers: role={role} broker={kafka.bootstrap_servers} "
        f"store={store_settings.kind} model={model} "
        + (f"metrics and probes=http://0.0.0.0:{port}" if port else "metrics disabled")
    )
    freeze_startup_heap(logger)
    try:
        workers.run(stop_event)
    finally:
        workers.close()
        if server is not None:
            server.shutdown()
    click.echo("relata workers: stopped")
