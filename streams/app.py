"""The Faust stream processor: profiles, association statistics, and the HTTP API.

The composition root of the stream processor: `build_app` / `build_streams` build a *new* app
per call (a Faust app cannot be restarted in one process); there is no import-time app. The
agents' handlers are glue around the pure logic in `streams/profile.py` and
`streams/association.py` (`streams/profiles_agent.py`, `streams/associations_agent.py`,
`streams/recommendations_agent.py`); tables are in `streams/tables.py`, names in
`streams/naming.py`, the Faust configuration in `streams/faust_config.py`:

- the profile agent (behavior-events, key user_id): decode → dead-letter on failure → fold into
  table `profiles` → `profile-updates` (+ the association input to `association-input`). Its
  input is read in record batches with librdkafka and its table is its own (both in
  `streams/event_consumer.py`: Faust's per-message path cost four times the agent's work);
  it runs as a Faust task beside the other agents, in consumer group `<app_id>-events`.
- `process_associations` (internal `association-input`, ONE partition): all pair counts of
  an item need the counts of its partners (lift, cosine), so the statistics live in one
  partition of table `associations` on one worker. It folds inputs in windows of
  `StreamsSettings.assoc_batch_window_s` (`stream.take_batches`), writes each touched record
  once per window and republishes the window's related lists that changed. Failover is by a
  standby replica (`table_standby_replicas=1`) that replays the changelog. Sharding by item
  would need a second hop for partner counts.
  The state is exact over crashes: the profile agent de-duplicates re-delivered events by
  event_id, and every association record stores the offset of the last association-input
  message folded into it, so re-delivered inputs are skipped per record
  (`streams.association.AssociationFold`); related lists are republished only on a material
  change of membership.
- `process_recommendations` (recommendations): the latest list per user in a table for HTTP.
- Tasks follow whole topics into in-memory views, in every worker: `item-catalog` into a
  `CatalogView` (known, available items); in role profiles `trending-items` into a
  `TrendingView` (the answer to a user with no list of their own); in role associations,
  unless a similar-items provider is injected (a Qdrant server), `similar-items` into a
  `SimilarView` (the `similar` lists the item indexer publishes).

`StreamsSettings.role` picks the agents: `profiles` (the profile agent, process_recommendations),
`associations` (process_associations and the related lists; Faust app id
`<app_id>-associations`, its own consumer group) or `all`. The association tables' changelog
topics and the association-input topic are named after the base app id in every role.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from faust.types import TP
from prometheus_client import CollectorRegistry

from kafkaio.consumer import renewing_consumer
from kafkaio.dead_letters import DeadLetters
from kafkaio.health import BrokerWatch, Health
from kafkaio.producer import ConfluentSender
from schemas.messages import RelatedItems, RelationKind
from schemas.settings import KafkaSettings, ReliabilitySettings, StreamsSettings
from schemas.topics import (
    BEHAVIOR_EVENTS,
    DEAD_LETTER,
    ERASURE_AUDIT,
    ERASURE_REQUESTS,
    ITEM_CATALOG,
    PROFILE_UPDATES,
    RECOMMENDATIONS,
    RELATED_ITEMS,
    SIMILAR_ITEMS,
    TRENDING_ITEMS,
)

from .association import AssociationConfig
from .associations_agent import AssociationAgent, InputCursor
from .catalog import CatalogView
from .erasure import ErasureForwarder
from .event_consumer import EventBatchConsumer, ProfileStore
from .faust_config import aiokafka_config, faust_settings, forbid_topic_auto_creation
from .metrics import StreamsMetrics
from .naming import (
    ASSOCIATION_INPUT,
    association_input_topic,
    client_id,
    events_group,
    faust_app_id,
    profiles_changelog_topic,
)
from .ports import Sender, SimilarItems
from .profile import FoldConfig
from .profiles_agent import ProfileAgent
from .rebalance_watch import RebalanceWatch, describe_rebalance, recovery_progress, request_rejoin
from .recommendations_agent import RecommendationsAgent
from .records import Record
from .similar import SimilarView
from .tables import JSON_VALUES, RAW_VALUES, changelog_table, local_size
from .transport import App
from .trending import TrendingView
from .web import register_views

logger = logging.getLogger(__name__)

STAGE = "streams"
# The profile agent's fetch (librdkafka) waits for this much data, or
# `StreamsSettings.fetch_wait_ms`. With one byte (the default of Kafka clients) every produce
# request upstream becomes a fetch round trip of its own, broker CPU for nothing; the short wait
# bounds what it adds to latency at light load. Faust's consumer asks for as much.
FETCH_MIN_BYTES = 65_536
# The Faust consumer's wait for 64 KiB (association inputs: batches are 1 s anyway; the
# recommendations table behind GET /users/...: at most this much staler than the topic). A
# short wait would make the table alone fetch dozens of times a second under load.
FAUST_FETCH_MAX_WAIT_MS = 500
# The association agent folds up to this many association-input messages (each the inputs of
# one profile batch) at once, waiting at most `StreamsSettings.assoc_batch_window_s` for them.
# Each batch rewrites every record it touched (and its changelog record), so longer windows are
# cheaper per input (fewer rewrites, fewer republished lists) at the cost of related lists
# lagging the stream by up to the window.
ASSOCIATION_BATCH_MAX = 5000
# How often the Faust consumer's state (rebalancing or not) is noted for the probes.
FAUST_WATCH_INTERVAL_S = 1.0


class StreamsError(RuntimeError):
    """Root of the stream processor's errors."""


class StoreUnavailableError(StreamsError):
    """The configured table store cannot be used in this environment."""


def check_store(settings: StreamsSettings) -> None:
    """Fail fast when `rocksdb://` is asked for but no RocksDB binding is installed."""
    if settings.store != "rocksdb://":
        return
    import importlib.util

    if not any(importlib.util.find_spec(name) for name in ("rocksdict", "rocksdb")):
        msg = (
            "RELATA_STREAMS_STORE=rocksdb:// needs the `rocksdict` package "
            "(pip install rocksdict); or use memory:// (also changelog-backed)"
        )
        raise StoreUnavailableError(msg)


@dataclass(slots=True)
class StreamsApp:
    """A built app: its tables, agents' handlers and the parts tests and the HTTP views reach.

    The handlers of a role that is not run (and their tables) are None.
    """

    app: Any
    kafka: KafkaSettings
    settings: StreamsSettings
    metrics: StreamsMetrics
    registry: CollectorRegistry
    catalog: CatalogView
    fold_config: FoldConfig
    assoc_config: AssociationConfig
    topic_names: dict[str, str]
    sender: Sender
    dead_letters: DeadLetters
    similar: SimilarItems | None
    health: Health = field(default_factory=Health)
    # The profiles' changelog: acknowledged after the outputs of a batch (the sender's).
    changelog_sender: Sender | None = None
    profiles: ProfileStore | None = None
    associations: Any = None
    association_totals: Any = None
    recommendations: Any = None
    # Role profiles: the trending list, for users with no list of their own.
    trending: TrendingView | None = None
    event_consumer: EventBatchConsumer | None = None
    rebalances: RebalanceWatch | None = None
    profile_agent: ProfileAgent | None = None
    association_agent: AssociationAgent | None = None
    recommendations_agent: RecommendationsAgent | None = None
    process_associations: Any = None
    process_recommendations: Any = None
    erasure_forwarder: ErasureForwarder | None = None
    forward_erasures: Any = None

    def related_of(
        self, item_id: str, *, kinds: Iterable[RelationKind] | None = None
    ) -> RelatedItems | None:
        """Current association neighbours of one item (None: no behaviour seen, or this role
        holds no association statistics)."""
        if self.association_agent is None:
            return None
        return self.association_agent.related_of(item_id, kinds=kinds)


def build_streams(
    *,
    kafka: KafkaSettings,
    settings: StreamsSettings,
    registry: CollectorRegistry,
    similar: SimilarItems | None = None,
    sender: Sender | None = None,
    catalog: CatalogView | None = None,
    follow_topics: bool = True,
    reliability: ReliabilitySettings | None = None,
) -> StreamsApp:
    """Build a new Faust app with its tables, agents and HTTP views (nothing starts yet).

    The app id is `kafka.topic_prefix + settings.app_id`, so the changelog topics Faust creates
    (`<id>-profiles-changelog`, ...) carry the deployment's prefix too. `reliability`: how
    outages are waited out and what the probes answer (`kafkaio.health`). `follow_topics`:
    run the tasks that follow the views' topics (unit tests fill the views themselves).
    `similar`: the provider of `similar` items; None: the `similar-items` topic's view.
    """
    reliability = reliability or ReliabilitySettings()
    check_store(settings)
    forbid_topic_auto_creation()
    base_id = kafka.topic(settings.app_id)
    profiles_role = settings.role in ("all", "profiles")
    associations_role = settings.role in ("all", "associations")
    app_id = faust_app_id(kafka, settings)
    # Faust's consumer is off the latency path in every role (association inputs, the
    # recommendations table for HTTP reads, changelogs): the broker gathers records before it
    # answers instead of one fetch round trip per message (the profile agent's own consumer
    # waits at most `fetch_wait_ms`).
    app = App(
        app_id,
        fetch_max_wait_ms=FAUST_FETCH_MAX_WAIT_MS,
        fetch_min_bytes=FETCH_MIN_BYTES,
        **faust_settings(kafka, settings),
    )
    names = {
        spec.name: kafka.topic(spec.name)
        for spec in (BEHAVIOR_EVENTS, ITEM_CATALOG, PROFILE_UPDATES, RELATED_ITEMS, RECOMMENDATIONS)
    }
    names[DEAD_LETTER.name] = kafka.topic(DEAD_LETTER.name)
    for spec in (ERASURE_REQUESTS, ERASURE_AUDIT, SIMILAR_ITEMS, TRENDING_ITEMS):
        names[spec.name] = kafka.topic(spec.name)
    names[ASSOCIATION_INPUT] = association_input_topic(kafka, settings)

    # The agents' sources (outputs go through the sender, by name).
    topics = {
        name: app.topic(names[name], key_serializer="raw", value_serializer="raw")
        for name in (RECOMMENDATIONS.name, ERASURE_REQUESTS.name)
    }
    # Raw values, decoded by the agent: Faust would throw a value it cannot decode into the
    # agent's stream and stop it; the agent dead-letters it instead.
    topics[ASSOCIATION_INPUT] = app.topic(
        names[ASSOCIATION_INPUT],
        partitions=1,
        internal=True,
        key_serializer="raw",
        value_serializer="raw",
    )
    metrics = StreamsMetrics.create(registry)
    changelog_sender = sender  # injected (tests): one sender, flushed twice
    if sender is None:
        sender = ConfluentSender.from_config(
            kafka.librdkafka_producer_config(client_id(settings)),
            ack_timeout_s=reliability.ack_timeout_s,
        )
        if profiles_role:
            changelog_sender = ConfluentSender.from_config(
                kafka.librdkafka_producer_config(f"{client_id(settings)}-changelog"),
                ack_timeout_s=reliability.ack_timeout_s,
            )
    streams = StreamsApp(
        app=app,
        kafka=kafka,
        settings=settings,
        metrics=metrics,
        registry=registry,
        catalog=catalog or CatalogView(),
        fold_config=FoldConfig.from_settings(settings),
        assoc_config=AssociationConfig.from_settings(settings),
        topic_names=names,
        sender=sender,
        changelog_sender=changelog_sender,
        dead_letters=DeadLetters(
            sender, topic=names[DEAD_LETTER.name], stage=STAGE, counter=metrics.dead_letter
        ),
        similar=similar,
        health=Health(
            ack_timeout_s=reliability.ack_timeout_s, stall_timeout_s=reliability.stall_timeout_s
        ),
    )
    _watch_health(streams, reliability)
    if profiles_role:
        _add_profile_agents(streams, topics, rejoin_timeout_s=reliability.rejoin_timeout_s)
        streams.trending = TrendingView(settings.trending_placement)
    if associations_role:
        _add_association_agents(streams, topics, base_id=base_id)
        if streams.similar is None:
            streams.similar = SimilarView(streams.catalog)
    if follow_topics:
        _follow_views(streams)

    register_views(streams)
    return streams


def _follow_views(streams: StreamsApp) -> None:
    """A task per in-memory view this process serves from, each following its whole topic."""
    kafka, settings, names = streams.kafka, streams.settings, streams.topic_names

    def config(view: str) -> dict[str, Any]:
        return aiokafka_config(kafka, f"{client_id(settings)}-{view}")

    async def follow_catalog() -> None:
        await streams.catalog.follow(names[ITEM_CATALOG.name], consumer_config=config("catalog"))

    streams.app.task(follow_catalog)
    trending = streams.trending
    if trending is not None:

        async def follow_trending() -> None:
            await trending.follow(names[TRENDING_ITEMS.name], consumer_config=config("trending"))

        streams.app.task(follow_trending)
    similar = streams.similar
    if isinstance(similar, SimilarView):

        async def follow_similar() -> None:
            await similar.follow(names[SIMILAR_ITEMS.name], consumer_config=config("similar"))

        streams.app.task(follow_similar)


def _watch_health(streams: StreamsApp, reliability: ReliabilitySettings) -> None:
    """Register what the probes look at: the catalog view, the sender's acknowledgement wait,
    the brokers (a metadata request every `broker_check_interval_s` through the sender's
    producer) and the Faust consumer (rebalancing, or settled)."""
    app: App = streams.app
    health = streams.health
    health.condition("catalog", streams.catalog.ready.is_set)
    if hasattr(streams.sender, "waiting_since"):
        health.wait("outputs", lambda: getattr(streams.sender, "waiting_since", None))
    changelog = streams.changelog_sender
    if changelog is not None and changelog is not streams.sender:
        health.wait("profiles changelog", lambda: getattr(changelog, "waiting_since", None))
    check = getattr(streams.sender, "check_broker", None)
    if check is not None:
        topic = streams.topic_names[BEHAVIOR_EVENTS.name]
        broker = BrokerWatch(
            lambda timeout: check(topic, timeout), interval_s=reliability.broker_check_interval_s
        )
        health.broker = broker

        async def watch_broker() -> None:
            loop = asyncio.get_running_loop()
            while True:
                await loop.run_in_executor(None, broker.check_once)
                await asyncio.sleep(broker.interval_s)

        app.task(watch_broker)
    rebalances = RebalanceWatch(
        # Partitions revoked or lost, not yet assigned and restored.
        rebalancing=lambda: bool(app.rebalancing),
        progress=partial(recovery_progress, app),
        rejoin=partial(request_rejoin, app),
        reachable=health.brokers_answer,
        watch=health.loop("faust consumer"),
        rejoin_after_s=reliability.rejoin_timeout_s,
        describe=partial(describe_rebalance, app),
    )
    streams.rebalances = rebalances

    async def watch_faust() -> None:
        rebalances.tick()

    app.timer(interval=FAUST_WATCH_INTERVAL_S)(watch_faust)


def _add_profile_agents(
    streams: StreamsApp, topics: dict[str, Any], *, rejoin_timeout_s: float
) -> None:
    """Role `profiles`: the profile agent (its own consumer and table, see
    streams/event_consumer.py) and the recommendations table with its Faust agent. Its event
    consumer is replaced by a new client when it stays without partitions for
    `rejoin_timeout_s` while the brokers answer (`RenewingConsumer`)."""
    app: App = streams.app
    kafka, settings, sender = streams.kafka, streams.settings, streams.sender
    app_id = faust_app_id(kafka, settings)
    directory = settings.data_dir / app_id if settings.store == "rocksdb://" else None
    streams.profiles = ProfileStore(
        changelog_topic=profiles_changelog_topic(kafka, settings),
        changelog=streams.changelog_sender or sender,
        directory=directory,
    )
    streams.profile_agent = ProfileAgent(
        profiles=streams.profiles,
        catalog=streams.catalog,
        sender=sender,
        dead_letters=streams.dead_letters,
        metrics=streams.metrics,
        fold_config=streams.fold_config,
        profile_updates_topic=streams.topic_names[PROFILE_UPDATES.name],
        association_input_topic=streams.topic_names[ASSOCIATION_INPUT],
        erasure_audit_topic=streams.topic_names[ERASURE_AUDIT.name],
    )
    client = kafka.librdkafka_config("relata-profiles")
    group = events_group(kafka, settings)
    session_ms = int(settings.session_timeout_s * 1000)
    consumer = EventBatchConsumer(
        consumer_config=client
        | {
            "group.id": group,
            # Incremental rebalancing: a rebalance revokes (and the new owner replays from the
            # changelog) only the partitions that move, not every partition of every member.
            "partition.assignment.strategy": "cooperative-sticky",
            "auto.offset.reset": "earliest",
            # Offsets are stored after a batch's outputs are acknowledged, committed from there.
            "enable.auto.offset.store": False,
            "enable.auto.commit": True,
            "auto.commit.interval.ms": int(settings.commit_interval_s * 1000),
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": int(min(settings.heartbeat_interval_s * 1000, session_ms / 3)),
            "fetch.wait.max.ms": settings.fetch_wait_ms,
            "fetch.min.bytes": FETCH_MIN_BYTES,
        },
        # Reads changelog partitions by assignment: its group id is never joined or committed.
        restore_config=kafka.librdkafka_config("relata-profiles-restore")
        | {"group.id": f"{group}-restore", "enable.auto.commit": False},
        topic=streams.topic_names[BEHAVIOR_EVENTS.name],
        store=streams.profiles,
        handle=streams.profile_agent.handle_events,
        to_record=Record.of_message,
        batch_max=settings.batch_max_events,
        window_s=settings.batch_wait_ms / 1000,
        lag_gauge=streams.metrics.consumer_lag,
        on_restored=streams.metrics.profiles_restored.inc,
        watch=streams.health.loop("profile agent"),
        client=partial(
            renewing_consumer,
            renew_after_s=rejoin_timeout_s,
            reachable=streams.health.brokers_answer,
        ),
    )
    streams.event_consumer = consumer
    app.task(consumer.run)

    streams.recommendations = changelog_table(
        app, "recommendations", partitions=kafka.partitions, schema=RAW_VALUES, sender=sender
    )
    recommendations = RecommendationsAgent(
        recommendations=streams.recommendations, sender=sender, dead_letters=streams.dead_letters
    )
    streams.recommendations_agent = recommendations

    @app.agent(topics[RECOMMENDATIONS.name], name="process-recommendations")
    async def process_recommendations(stream: Any) -> None:
        # A batch's records are acknowledged when the next batch is asked for, i.e. after the
        # handler returned with every output acknowledged by the broker (streams/transport.py).
        wait_s = settings.batch_wait_ms / 1000
        async for events in stream.take_batches(settings.batch_max_events, within=wait_s):
            records = [Record.of(event) for event in events]
            await recommendations.handle_recommendations(records, bind=stream._set_current_event)

    streams.process_recommendations = process_recommendations

    forwarder = ErasureForwarder(
        sender=sender,
        dead_letters=streams.dead_letters,
        behavior_events_topic=streams.topic_names[BEHAVIOR_EVENTS.name],
    )
    streams.erasure_forwarder = forwarder

    @app.agent(topics[ERASURE_REQUESTS.name], name="forward-erasures")
    async def forward_erasures(stream: Any) -> None:
        # Acknowledged once forwarded (the next batch is asked for after the handler returned).
        async for events in stream.take_batches(100, within=0.1):
            await forwarder.handle_requests([Record.of(event) for event in events])

    streams.forward_erasures = forward_erasures


def _add_association_agents(streams: StreamsApp, topics: dict[str, Any], *, base_id: str) -> None:
    """Role `associations`: the association tables and their agent, which republishes the
    related lists of each window.

    The changelog topics are named after the base app id in every role, so `all` and
    `associations` read and write the same state.
    """
    app: App = streams.app
    sender = streams.sender
    names = streams.topic_names
    streams.associations = changelog_table(
        app,
        "associations",
        partitions=1,
        schema=JSON_VALUES,
        sender=sender,
        changelog=f"{base_id}-associations-changelog",
    )
    streams.association_totals = changelog_table(
        app,
        "association-totals",
        partitions=1,
        schema=JSON_VALUES,
        sender=sender,
        changelog=f"{base_id}-association-totals-changelog",
    )
    agent = AssociationAgent(
        associations=streams.associations,
        association_totals=streams.association_totals,
        sender=sender,
        metrics=streams.metrics,
        config=streams.assoc_config,
        related_items_topic=streams.topic_names[RELATED_ITEMS.name],
        dead_letters=streams.dead_letters,
        shown=streams.catalog.shown,
    )
    streams.association_agent = agent

    @app.agent(topics[ASSOCIATION_INPUT], name="process-associations")
    async def process_associations(stream: Any) -> None:
        # A batch's inputs are acknowledged (and then committed) only when the next batch is
        # asked for: after its changelog records and the related lists it changed are
        # acknowledged by the broker. A crash before that re-delivers the inputs; the fold
        # skips them for the records that already hold them (their offsets are stored in the
        # records) and republishes those records' lists.
        batches = stream.take_batches(
            ASSOCIATION_BATCH_MAX, within=streams.settings.assoc_batch_window_s
        )
        cursor = InputCursor()
        async for events in batches:
            records, rewind = cursor.admit([Record.of(event) for event in events])
            # Held-back events leave the batch, so that they are not acknowledged either.
            events[:] = [record.event for record in records]
            for partition, offset in rewind.items():
                await _read_again(app, cursor, TP(names[ASSOCIATION_INPUT], partition), offset)
            if not events:
                continue
            # Table writes need a current event: the RocksDB store picks the partition's
            # database from it. The association tables have one partition, so the batch's last
            # event stands for the whole batch (Faust has no public setter for this).
            stream._set_current_event(events[-1])
            await agent.handle_association_batch(records)
            await streams.sender.flush()  # the changelog records (and their bytes freed)
            await agent.flush_related()  # then the lists: both before the inputs are acked

    async def count_association_items() -> None:
        streams.metrics.association_items.set(local_size(streams.associations))

    app.timer(interval=10.0)(count_association_items)
    streams.process_associations = process_associations


async def _read_again(app: Any, cursor: InputCursor, tp: TP, offset: int) -> None:
    """Seek the consumer back to `offset` of `tp`, where `cursor` found a gap (or to the
    partition's first offset, where retention deleted the messages before it)."""
    try:
        earliest = (await app.consumer.earliest_offsets(tp)).get(tp)
        if earliest is not None and earliest > offset:
            logger.warning(
                "association inputs deleted before they were folded partition=%d offsets=%d..%d",
                tp.partition,
                offset,
                earliest - 1,
            )
            offset = earliest
            cursor.skip_to(tp.partition, offset)
        logger.info(
            "association inputs with a gap: reading again partition=%d offset=%d",
            tp.partition,
            offset,
        )
        await app.consumer.seek(tp, offset)
    except Exception:  # e.g. no longer assigned: the next assignment reads from the commit
        logger.warning(
            "association inputs not read again partition=%d", tp.partition, exc_info=True
        )


def build_app(
    *,
    kafka: KafkaSettings,
    settings: StreamsSettings,
    registry: CollectorRegistry,
    similar: SimilarItems | None = None,
) -> Any:
    """A new Faust app (agents, tables, HTTP views) for these settings: see `build_streams`."""
    return build_streams(kafka=kafka, settings=settings, registry=registry, similar=similar).app


__all__ = [
    "ASSOCIATION_INPUT",
    "CatalogView",
    "Sender",
    "SimilarItems",
    "StreamsApp",
    "association_input_topic",
    "build_app",
    "build_streams",
    "events_group",
    "profiles_changelog_topic",
]
