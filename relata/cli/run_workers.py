"""`relata workers`: the composition root of the item indexer and the recommender.

Reads settings, creates topics, builds the Kafka clients, the encoder and the vector store,
serves Prometheus `/metrics` and the probes `/readyz` and `/livez` on one port, and runs the
loops until SIGTERM/SIGINT (ending within `RELATA_SHUTDOWN_GRACE_S` even while the broker is
away). A broker outage is waited out: no loop gives up on it. With `--role all` both
loops share ONE encoder and ONE store in one process (two threads): an embedded qdrant-edge
directory can be open in one process only, so that is how the demo runs.
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

from kafkaio.consumer import CommitRetry, RenewingConsumer
from kafkaio.health import BrokerWatch, Health, LoopWatch
from kafkaio.producer import NEVER_TIME_OUT
from relata.cli.settings_cli import build_settings, settings_options
from relata.runtime.health_server import serve_probes
from relata.runtime.preflight import require_kafka
from relata.runtime.process import freeze_startup_heap, stop_on_signals
from relata.runtime.topics import TopicError, ensure_topics, topic_name
from schemas.access import Component, component_access, topics_of
from schemas.settings import (
    EncoderSettings,
    FitSettings,
    IndexerSettings,
    KafkaSettings,
    RecommenderSettings,
    ReliabilitySettings,
    StoreSettings,
)
from schemas.topics import (
    DEAD_LETTER,
    ITEM_CATALOG,
    PROFILE_UPDATES,
    RECOMMENDATIONS,
    RELATED_ITEMS,
)

logger = logging.getLogger(__name__)

Role = Literal["indexer", "recommender", "all"]
# The principal (schemas.access) each role runs as: `all` needs both loops' ACLs.
COMPONENT_OF_ROLE: dict[Role, Component] = {
    "indexer": "indexer",
    "recommender": "recommender",
    "all": "workers",
}


def build_consumer(
    kafka: KafkaSettings,
    *,
    group_id: str,
    client_id: str,
    low_latency: bool = False,
    commit_retry: CommitRetry | None = None,
    renew_after_s: float | None = None,
) -> Any:
    """A confluent-kafka consumer with manual commits (offsets committed after the work);
    `commit_retry` hears of commits that failed, to send them again; `renew_after_s`: rebuilt
    when its partitions stay lost that long while the brokers answer (`RenewingConsumer`)."""
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
    if renew_after_s is not None:
        return RenewingConsumer(partial(Consumer, config), renew_after_s=renew_after_s)
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
        for close in [*self.closers, self.store.close, getattr(self.encoder, "close", None)]:
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
    fit_settings: FitSettings | None = None,
) -> Workers:
    """Build the loops of `role`; one encoder and one store serve both loops of `all`, one
    `Health` (their watches, the brokers) both probes; with the recommender, its background
    fitter (a loop of its own) unless `fit_settings` turn it off."""
    from workers.encoder import TransformerEncoder
    from workers.fitting.history_log import HistoryLog
    from workers.indexer import IndexerTopics, ItemIndexer
    from workers.metrics import WorkerMetrics
    from workers.model_identity import version_group
    from workers.recommender import Recommender, RecommenderTopics
    from workers.store_versions import build_store
    from workers.vector_store import ModelIdentity

    reliability = reliability or ReliabilitySettings()
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
            topics=IndexerTopics(catalog=topic_name(kafka, ITEM_CATALOG), dead_letter=dead_letter),
            max_batch=indexer_settings.max_batch,
            max_wait_ms=indexer_settings.max_wait_ms,
            watch=watch,
            ack_timeout_s=reliability.ack_timeout_s,
            commit_retry=retry,
        )
        health.wait("indexer outputs", lambda: indexer.producer.waiting_since)
        workers.loops.append(("indexer", indexer.run))
        workers.closers += [consumer.close, partial(producer.flush, stop_share_s)]
    if role in ("recommender", "all"):
        retry = CommitRetry()
        consumer = build_consumer(
            kafka,
            group_id=recommender_settings.group_id,
            client_id="relata-recommender",
            low_latency=True,
            commit_retry=retry,
            renew_after_s=reliability.rejoin_timeout_s,
        )
        watch = workers.watches["recommender"] = health.loop("recommender")
        subscribe_watched(consumer, topic_name(kafka, PROFILE_UPDATES), watch)
        related = build_related_consumer(kafka, group_prefix=recommender_settings.group_id)
        producer = build_producer(kafka, client_id="relata-recommender")
        fit = fit_settings or FitSettings()
        fitting = fit.enabled and recommender_settings.strategy == "hybrid"
        history_log = HistoryLog(fit.max_users) if fitting else None
        recommender = Recommender(
            consumer=consumer,
            related_consumer=related,
            producer=producer,
            encoder=encoder,
            store=store,
            metrics=metrics,
            topics=RecommenderTopics(
                profile_updates=topic_name(kafka, PROFILE_UPDATES),
                related_items=topic_name(kafka, RELATED_ITEMS),
                recommendations=topic_name(kafka, RECOMMENDATIONS),
                dead_letter=dead_letter,
            ),
            settings=recommender_settings,
            model=starting_model(recommender_settings, fit),
            watch=watch,
            ack_timeout_s=reliability.ack_timeout_s,
            stop_flush_s=stop_share_s,
            commit_retry=retry,
            on_history=None if history_log is None else history_log.record,
        )
        health.wait("recommender outputs", lambda: recommender.producer.waiting_since)
        workers.loops.append(("recommender", recommender.run))
        workers.closers += [consumer.close, related.close, partial(producer.flush, stop_share_s)]
        if history_log is not None:
            refitter = build_refitter(
                recommender, history_log=history_log, settings=fit, metrics=metrics
            )
            workers.loops.append(("fitter", refitter.run))
    health.broker = BrokerWatch(
        partial(producer.list_topics, topic_name(kafka, DEAD_LETTER)),
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
    from workers.fitting.refit import ProcessRunner, Refitter, store_items

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
    )


@click.command(name="workers")
@click.option(
    "--role",
    type=click.Choice(["indexer", "recommender", "all"]),
    default="all",
    show_default=True,
    envvar="RELATA_WORKERS_ROLE",
    show_envvar=True,
    help="Which loops to run; `all` shares one encoder and one store (needed for edge).",
)
@settings_options(ReliabilitySettings, group="reliability")
@settings_options(FitSettings, group="fit")
@settings_options(RecommenderSettings, group="recommender")
@settings_options(IndexerSettings, group="indexer")
@settings_options(StoreSettings, group="store")
@settings_options(EncoderSettings, group="encoder")
@settings_options(KafkaSettings, group="kafka")
def command(role: Role, **params: Any) -> None:
    """Run the item indexer and/or the recommender until SIGTERM/SIGINT."""
    kafka = build_settings(KafkaSettings, group="kafka", params=params)
    encoder_settings = build_settings(EncoderSettings, group="encoder", params=params)
    store_settings = build_settings(StoreSettings, group="store", params=params)
    indexer_settings = build_settings(IndexerSettings, group="indexer", params=params)
    recommender_settings = build_settings(RecommenderSettings, group="recommender", params=params)
    reliability = build_settings(ReliabilitySettings, group="reliability", params=params)
    fit_settings = build_settings(FitSettings, group="fit", params=params)

    access = component_access(kafka, indexer=indexer_settings, recommender=recommender_settings)[
        COMPONENT_OF_ROLE[role]
    ]
    require_kafka(kafka, needs=access.topics())
    try:
        created = ensure_topics(kafka, topics_of(access, kafka))
    except TopicError as exc:
        raise click.ClickException(str(exc)) from exc
    logger.info("topics ready created=%s", ",".join(created) or "none")
    registry = CollectorRegistry()
    port = indexer_settings.metrics_port if role == "indexer" else recommender_settings.metrics_port

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
        fit_settings=fit_settings,
    )
    # Once the model is loaded and the consumers built (the startup probe waits for it).
    server = serve_probes(port, registry=registry, health=workers.health) if port else None
    click.echo(
        f"relata workers: role={role} broker={kafka.bootstrap_servers} "
        f"store={store_settings.kind} model={workers.encoder.name}@{workers.encoder.version} "
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
