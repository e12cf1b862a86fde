"""The Faust stream processor: profiles, association statistics, and the HTTP API.

`build_app` / `build_streams` build a *new* app per call (a Faust app cannot be restarted in
one process); there is no import-time app. Agents are glue around the pure logic in
`streams/profile.py` and `streams/association.py`:

- the profile agent (behavior-events, key user_id): decode → dead-letter on failure → fold into
  table `profiles` → `profile-updates` (+ the association input to `association-input`). Its
  input is read in record batches with librdkafka and its table is its own (both in
  `streams/event_consumer.py`: Faust's per-message path cost four times the agent's work);
  it runs as a Faust task beside the other agents, in consumer group `<app_id>-events`.
- `process_associations` (internal `association-input`, ONE partition): all pair counts of
  an item need the counts of its partners (lift, cosine), so the statistics live in one
  partition of table `associations` on one worker. It folds inputs in windows of
  `StreamsSettings.assoc_batch_window_s` (`stream.take_events`) and writes each touched record
  once per window. Failover is by a standby replica
  (`table_standby_replicas=1`) that replays the changelog. Sharding by item would need a
  second hop for partner counts.
  Delivery is at least once: the profile agent de-duplicates re-delivered events by
  event_id, but after a crash (not a clean stop) association inputs committed late can be
  counted twice; related lists are republished only on a material change of membership.
- `process_recommendations` (recommendations): the latest list per user in a table for HTTP.
- A task follows `item-catalog` into a `CatalogView` (known, available items).

`StreamsSettings.role` picks the agents: `profiles` (the profile agent, process_recommendations),
`associations` (process_associations, the related-items timer; Faust app id
`<app_id>-associations`, its own consumer group) or `all`. The association tables' changelog
topics and the association-input topic are named after the base app id in every role.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import faust
import orjson
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from prometheus_client import CollectorRegistry

from kafkaio.dead_letters import DeadLetters
from kafkaio.producer import ConfluentSender
from schemas.decoding import Rejection, decode
from schemas.messages import (
    BehaviorEvent,
    Recommendation,
    RelatedItem,
    RelatedItems,
    RelationKind,
    UserProfile,
)
from schemas.settings import KafkaSettings, StreamsSettings
from schemas.topics import (
    BEHAVIOR_EVENTS,
    DEAD_LETTER,
    ITEM_CATALOG,
    PROFILE_UPDATES,
    RECOMMENDATIONS,
    RELATED_ITEMS,
)
from streams.web import register_views, stored_json

from .association import (
    ASSOCIATION_KINDS,
    AssociationConfig,
    AssociationInput,
    CountMemo,
    ItemRecord,
    Membership,
    TotalsRecord,
    apply_inputs,
    membership,
    membership_changed,
    related_items,
    top_partners,
)
from .catalog import CatalogView
from .event_consumer import EventBatchConsumer, ProfileStore
from .metrics import StreamsMetrics
from .profile import FoldConfig, fold_user_events, profile_update
from .transport import App

logger = logging.getLogger(__name__)

STAGE = "streams"
ASSOCIATION_INPUT = "association-input"
TOTALS_KEY = "totals"
# The profile agent's fetch (librdkafka) waits for this much data, or
# `StreamsSettings.fetch_wait_ms`. With one byte (the default of Kafka clients) every produce
# request upstream becomes a fetch round trip of its own, broker CPU for nothing; the short wait
# bounds what it adds to latency at light load. Faust's consumer asks for as much.
FETCH_MIN_BYTES = 65_536
# The Faust consumer's wait for 64 KiB (association inputs: batches are 1 s anyway; the
# recommendations table behind GET /users/...: at most this much staler than the topic). At
# 10 ms it fetched ~70 times a second at 500 events/s for the table alone.
FAUST_FETCH_MAX_WAIT_MS = 500
# The association agent folds up to this many association-input messages (each the inputs of
# one profile batch) at once, waiting at most `StreamsSettings.assoc_batch_window_s` for them.
# Each batch rewrites every record it touched (and its changelog record), so longer windows are
# cheaper per input: at 500 events/s on online-retail, 1 s -> 5 s took the agent from ~42 to
# ~29 % of a core, and the lists it republished from ~128 to ~93 a second.
ASSOCIATION_BATCH_MAX = 5000
# Inputs folded (and records written) between two yields of the event loop.
ASSOCIATION_SLICE = 32
# Related lists are recomputed for items touched since the last flush, at most this often.
RELATED_FLUSH_INTERVAL_S = 1.0
RELATED_YIELD_EVERY = 16


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


class SimilarItems(Protocol):
    """Vector-similar items of a catalog item (the composition root injects one)."""

    def similar(
        self, item_id: str, *, k: int, categories: Sequence[str] | None
    ) -> list[RelatedItem] | None:
        """Up to k items (kind "similar", best first, cosine in the evidence); with
        `categories` (the item's own, from the catalog) only items of its category.
        None when the item is unknown to the vector store."""
        ...


class Sender(Protocol):
    """Where the agents' output records and the tables' changelogs go (Kafka in production,
    a list in unit tests)."""

    def produce(
        self, topic: str, *, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None:
        """Queue one record (`partition` None: by the key)."""
        ...

    async def flush(self) -> None:
        """Return once everything sent is acknowledged (raise if it cannot be)."""
        ...


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed input record: what the handlers see, and where a dead letter points."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_s: float
    # The Faust event it came from, if any: made the current event before a table write (see
    # Bind).
    event: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, event: Any) -> Record:
        """The record of a Faust event."""
        message = event.message
        return cls(
            key=message.key,
            value=message.value,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            timestamp_s=message.timestamp,
            event=event,
        )

    @classmethod
    def of_message(cls, message: Any) -> Record:
        """The record of a confluent-kafka message."""
        _, timestamp_ms = message.timestamp()
        return cls(
            key=message.key(),
            value=message.value(),
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            timestamp_s=timestamp_ms / 1000,
        )


# Makes a record's Faust event the current one (`Stream._set_current_event`). Called before
# each table write of a batch: Faust writes a key's changelog to the partition of the *current
# event* (and the RocksDB store picks its database by it), so the current event must be one of
# that key's own records, not the batch's last.
Bind = Callable[[Any], None]


@dataclass(slots=True)
class StreamsApp:
    """A built app plus the parts tests and the HTTP views need to reach."""

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
    profiles: Any = None
    associations: Any = None
    association_totals: Any = None
    recommendations: Any = None
    event_consumer: EventBatchConsumer | None = None
    process_associations: Any = None
    process_recommendations: Any = None
    # Membership of the last published related lists (in memory: a restart republishes once).
    published: dict[str, Membership] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)

    # ---- profile agent -------------------------------------------------------------------
    async def handle_events(self, records: Sequence[Record]) -> None:
        """Validate, fold and forward a batch of behaviour events; bad input goes to
        dead-letter.

        Each user's events fold in order; a user's profile is written, and one profile update
        (naming every folded event) sent, once per batch: coalescing, so a burst of one
        user's events (an invoice, a session) costs one table write and one recommendation.
        The association inputs of the batch travel as one message, in input order. Returns
        once every output is acknowledged (the caller then acknowledges the inputs).
        """
        started = time.perf_counter()
        by_user: dict[str, list[tuple[int, BehaviorEvent, Record]]] = {}
        for index, record in enumerate(records):
            event = await self._validated(record)
            if event is not None:
                by_user.setdefault(event.user_id, []).append((index, event, record))
        inputs: list[tuple[int, dict[str, Any]]] = []
        for user_id, events in by_user.items():
            await self._fold_user(user_id, events, inputs)
        if inputs:
            inputs.sort(key=lambda pair: pair[0])
            self.sender.produce(
                self.topic_names[ASSOCIATION_INPUT],
                key=None,
                value=orjson.dumps([data for _, data in inputs]),
            )
        await self.sender.flush()
        self.metrics.event_batch_size.observe(len(records))
        self.metrics.event_processing_seconds.observe(time.perf_counter() - started)

    async def _validated(self, record: Record) -> BehaviorEvent | None:
        decoded = decode(record.value, BehaviorEvent)
        if isinstance(decoded, Rejection):
            await self.reject(decoded, record)
            return None
        event = decoded
        if record.key != event.user_id.encode("utf-8"):
            reason = (
                f"record key {record.key!r} is not the event's user_id {event.user_id!r}: "
                "behavior-events must be keyed by user_id so a user's events share a partition"
            )
            await self.reject(Rejection("invalid_fields", reason), record)
            return None
        if not self.catalog.ready.is_set():
            await self.catalog.ready.wait()
        if event.item_id not in self.catalog:
            reason = f"item_id {event.item_id!r} is not an available item of the catalog"
            await self.reject(Rejection("unknown_item", reason), record)
            return None
        self.metrics.events_consumed.labels(event.event_type).inc()
        return event

    async def _fold_user(
        self,
        user_id: str,
        events: Sequence[tuple[int, BehaviorEvent, Record]],
        inputs: list[tuple[int, dict[str, Any]]],
    ) -> None:
        """Fold one user's events of a batch (in order); write the profile and send one
        update. An event that fails to fold is dead-lettered; the others still count."""
        partition = events[0][2].partition  # keyed by user_id: a user is one partition
        try:
            stored = self.profiles.get(partition, user_id)
            profile = (
                None if stored is None else UserProfile.model_validate_json(stored_json(stored))
            )
        except Exception as exc:  # corrupt state: keep the stream flowing, keep the records
            await self._failed(exc, events)
            return
        fold = fold_user_events(profile, [event for _, event, _ in events], self.fold_config)
        for at, error in fold.failed:  # dead-letter the event whose fold raised; the rest count
            await self._failed(error, [events[at]])
        self.metrics.events_duplicate.inc(fold.duplicates)
        folded: list[tuple[BehaviorEvent, Record]] = []
        for at, result in fold.changed:
            index, event, record = events[at]
            folded.append((event, record))
            assoc = AssociationInput.from_fold(result, event)
            if assoc is not None:
                inputs.append((index, assoc.to_dict()))
        profile = fold.profile
        if profile is None or not folded:
            return
        self.profiles.put(partition, user_id, profile.model_dump_json().encode("utf-8"))
        update = profile_update(
            profile,
            trigger_event_ids=[event.event_id for event, _ in folded],
            # The oldest folded event's produce time: latency counts from the first trigger.
            source_ts_ms=max(0, int(min(record.timestamp_s for _, record in folded) * 1000)),
            now=datetime.now(UTC),
            event=folded[-1][0],
        )
        self.sender.produce(
            self.topic_names[PROFILE_UPDATES.name],
            key=user_id.encode("utf-8"),
            value=update.model_dump_json().encode("utf-8"),
        )
        self.metrics.profile_updates.inc()

    async def _failed(
        self, exc: Exception, events: Sequence[tuple[int, BehaviorEvent, Record]]
    ) -> None:
        for _, event, record in events:
            logger.error(
                "processing failed %s[%d] offset=%d user_id=%s",
                record.topic,
                record.partition,
                record.offset,
                event.user_id,
                exc_info=exc,
            )
            rejection = Rejection("processing_error", f"{type(exc).__name__}: {exc}")
            await self.reject(rejection, record)

    async def reject(self, rejection: Rejection, where: Record) -> None:
        """Send one input to `dead-letter` with its reason and position, and count it."""
        self.dead_letters.send_at(
            rejection,
            topic=where.topic,
            partition=where.partition,
            offset=where.offset,
            key=where.key,
            value=where.value,
        )

    # ---- association agent ---------------------------------------------------------------
    async def handle_association_batch(self, messages: Sequence[Any]) -> None:
        """Fold a batch of association-input messages (each a list of inputs, in order) into
        the records and the totals.

        The statistics equal one-by-one application; each touched record (and the totals) is
        written to its changelog-backed table once per batch, not once per input: a record
        holds up to capacity x kinds partners, and serialising it was the agent's main cost.
        The work is done in slices of ASSOCIATION_SLICE inputs (and record writes) with the
        event loop let go between them, so a large batch never holds up the profile agent,
        which shares the loop, for more than a few milliseconds.
        """
        inputs = [
            AssociationInput.from_dict(data)
            for message in messages
            # A list per profile batch; a single input from a version before batching.
            for data in (message if isinstance(message, list) else [message])
        ]
        if not inputs:
            return
        state = self.association_totals.get(TOTALS_KEY) or {"totals": None, "clock": 0.0}
        totals = state["totals"]
        touched: dict[str, ItemRecord] = {}
        table = self.associations

        def lookup(item_id: str) -> ItemRecord | None:
            record = touched.get(item_id)
            return table.get(item_id) if record is None else record

        for start in range(0, len(inputs), ASSOCIATION_SLICE):
            if start:
                await asyncio.sleep(0)
            part, totals = apply_inputs(
                inputs[start : start + ASSOCIATION_SLICE],
                lookup=lookup,
                totals=totals,
                config=self.assoc_config,
            )
            touched.update(part)
        for n, (item_id, record) in enumerate(touched.items(), start=1):
            table[item_id] = record
            if n % ASSOCIATION_SLICE == 0:
                await asyncio.sleep(0)
        self.dirty.update(touched)
        clock = max(float(state["clock"]), *(inp.ts for inp in inputs))
        self.association_totals[TOTALS_KEY] = {"totals": totals, "clock": clock}
        self.metrics.association_updates.inc(len(inputs))

    def association_clock(self) -> tuple[TotalsRecord | None, float]:
        """The global totals and the event-time clock (latest event ts) of the statistics."""
        state = self.association_totals.get(TOTALS_KEY)
        if state is None:
            return None, 0.0
        return state["totals"], float(state["clock"])

    def related_of(
        self, item_id: str, *, kinds: Iterable[RelationKind] = ASSOCIATION_KINDS
    ) -> RelatedItems | None:
        """Current association neighbours of one item (None: no behaviour seen)."""
        record: ItemRecord | None = self.associations.get(item_id)
        if record is None:
            return None
        totals, clock = self.association_clock()
        return related_items(
            record,
            lookup=self.associations.get,
            totals=totals,
            now=clock,
            config=self.assoc_config,
            kinds=kinds,
        )

    async def flush_related(self) -> int:
        """Publish the related lists of touched items that changed materially.

        Membership is checked on the scored top list; the evidence objects are built only for
        the lists that are published.
        """
        if not self.dirty:
            return 0
        items, self.dirty = self.dirty, set()
        totals, clock = self.association_clock()
        lookup = self.associations.get
        # The partners' counts at `clock`, looked up once per flush (lists share partners).
        memo: CountMemo = {}
        published = 0
        for n, item_id in enumerate(sorted(items), start=1):
            if n % RELATED_YIELD_EVERY == 0:
                # Many dirty items take tens of milliseconds: let the profile agent run between.
                await asyncio.sleep(0)
            record: ItemRecord | None = lookup(item_id)
            if record is None:
                continue
            top = top_partners(
                record, lookup=lookup, now=clock, config=self.assoc_config, memo=memo
            )
            after = membership(top)
            before = self.published.get(item_id)
            if not membership_changed(before, after, self.assoc_config.republish_change):
                continue
            new = related_items(
                record,
                lookup=lookup,
                totals=totals,
                now=clock,
                config=self.assoc_config,
                top=top,
            )
            self.sender.produce(
                self.topic_names[RELATED_ITEMS.name],
                key=item_id.encode("utf-8"),
                value=new.model_dump_json().encode("utf-8"),
            )
            self.published[item_id] = after
            published += 1
        await self.sender.flush()
        self.metrics.related_items_published.inc(published)
        return published

    # ---- recommendations table ------------------------------------------------------------
    async def handle_recommendations(self, records: Sequence[Record], *, bind: Bind) -> None:
        """Keep the latest recommendation list per user (a tombstone deletes it); each user's
        entry is written once per batch."""
        latest: dict[str, Record] = {}
        for record in records:
            if record.value is None:
                if record.key is not None:
                    latest[record.key.decode("utf-8", errors="replace")] = record
                continue
            decoded = decode(record.value, Recommendation)
            if isinstance(decoded, Rejection):
                await self.reject(decoded, record)
                continue
            latest[decoded.user_id] = record
        for user_id, record in latest.items():
            bind(record.event)
            if record.value is None:
                self.recommendations.pop(user_id, None)
            else:
                self.recommendations[user_id] = record.value
        await self.sender.flush()


def _broker_urls(kafka: KafkaSettings) -> list[str]:
    return [f"kafka://{hp.strip()}" for hp in kafka.bootstrap_servers.split(",") if hp.strip()]


def _credentials(kafka: KafkaSettings) -> Any:
    if kafka.security_protocol.startswith("SASL"):
        assert kafka.sasl_password is not None  # KafkaSettings validates SASL completeness
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            mechanism=kafka.sasl_mechanism,
            ssl_context=_ssl_context(kafka),
        )
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(_ssl_context(kafka))
    return None


def _ssl_context(kafka: KafkaSettings) -> Any:
    if kafka.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    import ssl

    return ssl.create_default_context(cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)


def aiokafka_config(kafka: KafkaSettings, client_id: str) -> dict[str, Any]:
    """aiokafka client config (bootstrap servers, security, client id) from KafkaSettings."""
    config: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap_servers, "client_id": client_id}
    credentials = _credentials(kafka)
    if credentials is not None:
        config.update(credentials_to_aiokafka_auth(credentials, None))
    return config


def client_id(settings: StreamsSettings) -> str:
    """The Kafka client id of this role's Faust app and sender: `relata-streams-<role>` (the
    profile agent's own consumer is `relata-profiles`)."""
    return f"relata-streams-{settings.role}"


def faust_settings(kafka: KafkaSettings, settings: StreamsSettings) -> dict[str, Any]:
    """Faust configuration from the settings (timeouts per shared/NOTES.md)."""
    session = settings.session_timeout_s
    return {
        "broker": _broker_urls(kafka),
        "broker_client_id": client_id(settings),
        "broker_credentials": _credentials(kafka),
        "store": settings.store,
        "datadir": str(settings.data_dir),
        "autodiscover": False,
        "topic_partitions": kafka.partitions,
        "topic_replication_factor": kafka.replication_factor,
        "table_standby_replicas": 1,
        "broker_session_timeout": session,
        "broker_heartbeat_interval": min(settings.heartbeat_interval_s, session / 3),
        # A member that does not rejoin within this is dropped; Faust's default (60 s) makes
        # a restart after a crash wait a minute.
        "broker_rebalance_timeout": max(2.0, session),
        "broker_request_timeout": max(90.0, session * 2),
        "broker_commit_interval": settings.commit_interval_s,
        "consumer_auto_offset_reset": "earliest",
        "producer_linger": 0.0,
        "web_enabled": settings.web_port != 0,
        "web_host": settings.web_host,
        "web_bind": settings.web_host,
        "web_port": settings.web_port or 6066,
        "worker_redirect_stdouts": False,
        "logging_config": None,
    }


def build_streams(
    *,
    kafka: KafkaSettings,
    settings: StreamsSettings,
    registry: CollectorRegistry,
    similar: SimilarItems | None = None,
    sender: Sender | None = None,
    catalog: CatalogView | None = None,
    follow_catalog: bool = True,
) -> StreamsApp:
    """Build a new Faust app with its tables, agents and HTTP views (nothing starts yet).

    The app id is `kafka.topic_prefix + settings.app_id`, so the changelog topics Faust creates
    (`<id>-profiles-changelog`, ...) carry the deployment's prefix too.
    """
    check_store(settings)
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
    names[ASSOCIATION_INPUT] = association_input_topic(kafka, settings)

    # The agents' sources (outputs go through the sender, by name).
    topics = {
        name: app.topic(names[name], key_serializer="raw", value_serializer="raw")
        for name in (RECOMMENDATIONS.name,)
    }
    topics[ASSOCIATION_INPUT] = app.topic(
        names[ASSOCIATION_INPUT],
        partitions=1,
        internal=True,
        key_serializer="raw",
        value_serializer="json",
    )
    metrics = StreamsMetrics.create(registry)
    sender = sender or ConfluentSender.from_config(
        kafka.librdkafka_producer_config(client_id(settings))
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
        dead_letters=DeadLetters(
            sender, topic=names[DEAD_LETTER.name], stage=STAGE, counter=metrics.dead_letter
        ),
        similar=similar,
    )
    if profiles_role:
        _add_profile_agents(streams, topics)
    if associations_role:
        _add_association_agents(streams, topics, base_id=base_id)

    async def follow_catalog_task() -> None:
        await streams.catalog.follow(
            names[ITEM_CATALOG.name],
            consumer_config=aiokafka_config(kafka, f"{client_id(settings)}-catalog"),
        )

    if follow_catalog:
        app.task(follow_catalog_task)

    register_views(streams)
    return streams


def faust_app_id(kafka: KafkaSettings, settings: StreamsSettings) -> str:
    """The Faust app id, and so the consumer group, of the settings' role.

    Each role is its own Faust app (its own consumer group and table assignment): the prefixed
    `app_id`, `<that>-associations` for role associations. `all` keeps the base id, so its
    topics are those of the two roles run apart.
    """
    base_id = kafka.topic(settings.app_id)
    return f"{base_id}-associations" if settings.role == "associations" else base_id


def association_input_topic(kafka: KafkaSettings, settings: StreamsSettings) -> str:
    """The internal topic from the profile agent to the association agent (one partition)."""
    return f"{kafka.topic(settings.app_id)}-{ASSOCIATION_INPUT}"


# Keys are str; values raw JSON bytes (pydantic models) or JSON dicts (association records).
RAW_VALUES: faust.Schema[str, bytes] = faust.Schema(
    key_type=str, value_type=bytes, key_serializer="raw", value_serializer="raw"
)
JSON_VALUES: faust.Schema[str, Any] = faust.Schema(
    key_type=str, key_serializer="raw", value_serializer="json"
)


def _add_profile_agents(streams: StreamsApp, topics: dict[str, Any]) -> None:
    """Role `profiles`: the profile agent (its own consumer and table, see
    streams/event_consumer.py) and the recommendations table with its Faust agent."""
    app: App = streams.app
    kafka, settings, sender = streams.kafka, streams.settings, streams.sender
    app_id = faust_app_id(kafka, settings)
    directory = settings.data_dir / app_id if settings.store == "rocksdb://" else None
    streams.profiles = ProfileStore(
        changelog_topic=profiles_changelog_topic(kafka, settings),
        changelog=sender,
        directory=directory,
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
        handle=streams.handle_events,
        to_record=Record.of_message,
        batch_max=settings.batch_max_events,
        window_s=settings.batch_wait_ms / 1000,
        lag_gauge=streams.metrics.consumer_lag,
        on_restored=streams.metrics.profiles_restored.inc,
    )
    streams.event_consumer = consumer
    app.task(consumer.run)

    streams.recommendations = _table(
        app, "recommendations", partitions=kafka.partitions, schema=RAW_VALUES, sender=sender
    )

    @app.agent(topics[RECOMMENDATIONS.name], name="process-recommendations")
    async def process_recommendations(stream: Any) -> None:
        # A batch's records are acknowledged when the next batch is asked for, i.e. after the
        # handler returned with every output acknowledged by the broker (transport.py).
        wait_s = settings.batch_wait_ms / 1000
        async for events in stream.take_batches(settings.batch_max_events, within=wait_s):
            records = [Record.of(event) for event in events]
            await streams.handle_recommendations(records, bind=stream._set_current_event)

    streams.process_recommendations = process_recommendations


def events_group(kafka: KafkaSettings, settings: StreamsSettings) -> str:
    """The profile agent's consumer group (of behavior-events): `<app id>-events`."""
    return f"{faust_app_id(kafka, settings)}-events"


def profiles_changelog_topic(kafka: KafkaSettings, settings: StreamsSettings) -> str:
    """The profiles table's compacted changelog (the name Faust gave it when it owned it)."""
    return f"{faust_app_id(kafka, settings)}-profiles-changelog"


def _add_association_agents(streams: StreamsApp, topics: dict[str, Any], *, base_id: str) -> None:
    """Role `associations`: the association tables, their agent and the related-items timer.

    The changelog topics are named after the base app id in every role, so `all` and
    `associations` read and write the same state.
    """
    app: App = streams.app
    sender = streams.sender
    streams.associations = _table(
        app,
        "associations",
        partitions=1,
        schema=JSON_VALUES,
        sender=sender,
        changelog=f"{base_id}-associations-changelog",
    )
    streams.association_totals = _table(
        app,
        "association-totals",
        partitions=1,
        schema=JSON_VALUES,
        sender=sender,
        changelog=f"{base_id}-association-totals-changelog",
    )

    @app.agent(topics[ASSOCIATION_INPUT], name="process-associations")
    async def process_associations(stream: Any) -> None:
        batches = stream.take_events(
            ASSOCIATION_BATCH_MAX, within=streams.settings.assoc_batch_window_s
        )
        async for events in batches:
            # Table writes need a current event: the RocksDB store picks the partition's
            # database from it. The association tables have one partition, so the batch's last
            # event stands for the whole batch (Faust has no public setter for this).
            stream._set_current_event(events[-1])
            await streams.handle_association_batch([event.value for event in events])
            await streams.sender.flush()  # the changelog records, before the inputs are acked

    async def publish_related() -> None:
        await streams.flush_related()

    async def count_association_items() -> None:
        streams.metrics.association_items.set(_local_size(streams.associations))

    app.timer(interval=RELATED_FLUSH_INTERVAL_S)(publish_related)
    app.timer(interval=10.0)(count_association_items)
    streams.process_associations = process_associations


class ChangelogTable(faust.Table[Any, Any]):
    """A Faust table whose changelog records go through the stream processor's `Sender`.

    Faust's own send path (FutureMessage, producer buffer, aiokafka) cost ~0.3 ms of the event
    loop per table write; the writes of a batch now queue in librdkafka and are acknowledged
    by the batch's `flush`, before its input offsets are. Same topic, partition (the current
    event's, as Faust does), key and value encoding, so Faust's recovery and standby replicas
    read them as their own. Not done: the RocksDB store's persisted-offset bookkeeping, so a
    restart with rocksdb:// replays the changelog from its start (correct, slower).
    """

    sender: Sender
    # The changelog topic's name; None: Faust's `<app id>-<table>-changelog`.
    changelog_name: str | None = None

    def _changelog_topic_name(self) -> str:
        return self.changelog_name or super()._changelog_topic_name()

    def on_key_set(self, key: Any, value: Any) -> None:
        partition = self.partition_for_key(key)
        topic = self.changelog_topic
        raw_key, _ = topic.prepare_key(key, self.key_serializer)
        raw_value, _ = topic.prepare_value(value, self.value_serializer)
        self.sender.produce(
            topic.get_topic_name(), key=raw_key, value=raw_value, partition=partition
        )
        if partition is not None:
            self._maybe_set_key_ttl(key, partition)
        self._sensor_on_set(self, key, value)

    def on_key_del(self, key: Any) -> None:
        partition = self.partition_for_key(key)
        topic = self.changelog_topic
        raw_key, _ = topic.prepare_key(key, self.key_serializer)
        self.sender.produce(topic.get_topic_name(), key=raw_key, value=None, partition=partition)
        if partition is not None:
            self._maybe_del_key_ttl(key, partition)
        self._sensor_on_del(self, key)


def _table(
    app: Any,
    name: str,
    *,
    partitions: int,
    schema: Any,
    sender: Sender,
    changelog: str | None = None,
) -> Any:
    table_class = SinglePartitionTable if partitions == 1 else ChangelogTable
    table = table_class(
        app, name=name, default=None, beacon=app.tables.beacon, partitions=partitions, schema=schema
    )
    table.sender = sender
    table.changelog_name = changelog
    return app.tables.add(table)


class SinglePartitionTable(ChangelogTable):
    """A table of one partition: every key is in partition 0.

    Faust finds a key's partition from the current event, which is not set where an agent
    consumes `stream.take` batches; with one partition the answer needs no event.
    """

    def partition_for_key(self, key: Any) -> int | None:
        return 0


def _local_size(table: Any) -> int:
    try:
        return len(table)
    except Exception:  # a store without a cheap len: skip this sample
        return 0


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
    "build_app",
    "build_streams",
    "events_group",
    "profiles_changelog_topic",
]
