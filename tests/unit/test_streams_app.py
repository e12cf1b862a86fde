"""Unit tests of the stream processor's glue: the profile agent's handler fed record batches,
the Faust agents run with `agent.test_context()` and a memory store; outputs are captured by a
recording sender instead of Kafka."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate
from prometheus_client import CollectorRegistry

import streams.profile as profile_module
from schemas import vocabulary
from schemas.messages import DeadLetter, Evidence, ProfileUpdate, RelatedItem, RelatedItems
from schemas.settings import KafkaSettings, StreamsSettings
from streams.app import StreamsApp, build_streams
from streams.association import AssociationInput, input_updates
from streams.associations_agent import AssociationAgent, InputCursor
from streams.catalog import CatalogView
from streams.naming import ASSOCIATION_INPUT
from streams.neighbours import AssociationIndex
from streams.records import Record
from streams.web import BadRequest, openapi_document, parse_related_query, related_body


def run_async(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (the project has no asyncio pytest plugin)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.partitions: list[tuple[str, int | None]] = []
        self.tombstones: list[tuple[str, bytes | None]] = []
        self.headers: list[tuple[str, list[tuple[str, bytes]]]] = []

        self.flushes = 0

    def produce(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> None:
        if value is not None:
            self.sent.append((topic, key, value))
        else:
            self.tombstones.append((topic, key))
        if headers:
            self.headers.append((topic, list(headers)))
        self.partitions.append((topic, partition))

    async def flush(self) -> None:
        self.flushes += 1

    def values(self, topic: str) -> list[bytes]:
        return [value for t, _, value in self.sent if t == topic]


class FakeSimilar:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Sequence[str] | None]] = []

    def similar(
        self, item_id: str, *, k: int, categories: Sequence[str] | None
    ) -> list[RelatedItem] | None:
        self.calls.append((item_id, k, categories))
        return [
            RelatedItem(
                item_id=f"sim-{n}",
                kind="similar",
                score=1.0 - n / 10,
                evidence=Evidence(cosine=1.0 - n / 10, text="similar"),
            )
            for n in range(k)
        ]


@pytest.fixture
def sender() -> RecordingSender:
    return RecordingSender()


def make_streams(tmp_path: Path, sender: RecordingSender, **settings: Any) -> StreamsApp:
    """An app whose agents fold one event per batch unless `batch_max_events` says otherwise
    (a batch is handled the moment it is full, so batch boundaries never depend on timing)."""
    options: dict[str, Any] = {"batch_max_events": 1, "batch_wait_ms": 10_000.0} | settings
    app = build_streams(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        settings=StreamsSettings(web_port=0, data_dir=tmp_path, assoc_min_support=2, **options),
        registry=CollectorRegistry(),
        sender=sender,
        follow_topics=False,
    )
    app.catalog.set_items({"i1": ("Hair",), "i2": ("Hair",), "i3": ("Nails",), "cold": ("Hair",)})
    return app


@pytest.fixture
def streams(tmp_path: Path, sender: RecordingSender) -> StreamsApp:
    return make_streams(tmp_path, sender)


NOW = datetime.now(UTC).replace(microsecond=0)


def event(
    n: int, *, user: str = "u1", item: str = "i1", kind: str = "purchase", **extra: Any
) -> dict[str, Any]:
    return {
        "event_id": f"e{n}",
        "user_id": user,
        "item_id": item,
        "event_type": kind,
        "ts": (NOW + timedelta(seconds=n)).isoformat(),
        **extra,
    }


def encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


async def settled(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until `condition()` holds (the agents run concurrently with the test)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "agent did not finish in time"
        await asyncio.sleep(0.005)


def records_of(
    pairs: Sequence[tuple[bytes | None, bytes]], *, partitions: Sequence[int] | None = None
) -> list[Record]:
    """behavior-events records at offsets 0.. (partition 0 unless `partitions` says)."""
    return [
        Record(
            key=key,
            value=value,
            topic="behavior-events",
            partition=0 if partitions is None else partitions[offset],
            offset=offset,
            timestamp_s=1_700_000_000.25 + offset,
        )
        for offset, (key, value) in enumerate(pairs)
    ]


async def put_events(
    streams: StreamsApp,
    pairs: Sequence[tuple[bytes | None, bytes]],
    *,
    partitions: Sequence[int] | None = None,
) -> None:
    """Feed the profile agent in batches of `batch_max_events`, as its consumer hands them
    out, on assigned (opened) partitions."""
    records = records_of(pairs, partitions=partitions)
    for partition in {record.partition for record in records} - streams.profiles.partitions:
        streams.profiles.open(partition)
    size = streams.settings.batch_max_events
    profile_agent = streams.profile_agent
    assert profile_agent is not None
    for start in range(0, len(records), size):
        await profile_agent.handle_events(records[start : start + size])


def association_inputs(streams: StreamsApp, sender: RecordingSender) -> list[dict[str, Any]]:
    """Every association input sent, in order (one message carries a batch's inputs)."""
    messages = [json.loads(v) for v in sender.values(streams.topic_names[ASSOCIATION_INPUT])]
    return [data for message in messages for data in message]


def association_agent(streams: StreamsApp) -> AssociationAgent:
    assert streams.association_agent is not None
    return streams.association_agent


def dead_letters(sender: RecordingSender) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(v) for v in sender.values("dead-letter")]


@run_async
async def test_events_fold_into_profile_and_emit_updates(
    streams: StreamsApp, sender: RecordingSender
) -> None:
    await put_events(
        streams,
        [
            (b"u1", encode(event(1, item="i1", session_id="b1"))),
            (b"u1", encode(event(2, item="i2", session_id="b1"))),
        ],
    )
    updates = [ProfileUpdate.model_validate_json(v) for v in sender.values("profile-updates")]
    assert [u.last_item_id for u in updates] == ["i1", "i2"]
    assert [h.item_id for h in updates[-1].history] == ["i2", "i1"]
    # source_ts_ms is the Kafka record timestamp, not the event's own time.
    assert [u.source_ts_ms for u in updates] == [1_700_000_000_250, 1_700_000_001_250]
    assert updates[-1].trigger_event_ids == ["e2"]
    assert {key for topic, key, _ in sender.sent if topic == "profile-updates"} == {b"u1"}
    stored = streams.profiles.get(0, "u1")
    assert stored is not None and json.loads(stored)["session_items"] == ["i1", "i2"]
    # The second purchase of the basket pairs with the first on the association input.
    inputs = association_inputs(streams, sender)
    assert inputs[-1]["item_id"] == "i2" and inputs[-1]["basket_items"] == ["i1"]
    assert inputs[-1]["kind"] == "bought_together"
    assert dead_letters(sender) == []


@run_async
async def test_a_batch_coalesces_each_users_events_into_one_update(tmp_path: Path) -> None:
    sender = RecordingSender()
    streams = make_streams(tmp_path, sender, batch_max_events=5)
    await put_events(
        streams,
        [
            (b"u1", encode(event(1, user="u1", item="i1", session_id="b1"))),
            (b"u2", encode(event(2, user="u2", item="i1", session_id="b2"))),
            (b"u1", encode(event(3, user="u1", item="i2", session_id="b1"))),
            (b"u1", b"{not json"),
            (b"u1", encode(event(1, user="u1", item="i1", session_id="b1"))),  # re-delivered
        ],
    )
    updates = {
        u.user_id: u
        for u in (ProfileUpdate.model_validate_json(v) for v in sender.values("profile-updates"))
    }
    assert len(sender.values("profile-updates")) == 2
    assert updates["u1"].trigger_event_ids == ["e1", "e3"]
    assert [h.item_id for h in updates["u1"].history] == ["i2", "i1"]
    # Latency is counted from the oldest folded event's record (offset 0).
    assert updates["u1"].source_ts_ms == 1_700_000_000_250
    assert updates["u2"].trigger_event_ids == ["e2"]
    # One association message for the batch, its inputs in input order.
    assert len(sender.values(streams.topic_names[ASSOCIATION_INPUT])) == 1
    inputs = association_inputs(streams, sender)
    assert [(i["item_id"], i["basket_items"]) for i in inputs] == [
        ("i1", []),
        ("i1", []),
        ("i2", ["i1"]),
    ]
    assert [(d.error_type, d.offset) for d in dead_letters(sender)] == [("malformed_json", 3)]
    assert streams.registry.get_sample_value("relata_events_duplicate_total") == 1.0
    assert streams.registry.get_sample_value("relata_event_batch_size_count") == 1.0
    assert sender.flushes >= 1
    assert {"u1", "u2"} <= set(streams.profiles.keys())


@run_async
async def test_changelog_records_go_to_the_partition_of_each_users_events(
    tmp_path: Path,
) -> None:
    # One batch spans two partitions; each profile's changelog record must land on its own
    # user's partition (Faust restores a partition's table rows from that changelog partition).
    sender = RecordingSender()
    streams = make_streams(tmp_path, sender, batch_max_events=2)
    await put_events(
        streams,
        [(b"u1", encode(event(1, user="u1"))), (b"u2", encode(event(2, user="u2")))],
        partitions=[3, 1],
    )
    changelog = streams.profiles.changelog_topic
    assert changelog == "relata-streams-profiles-changelog"
    keys = [key for topic, key, _ in sender.sent if topic == changelog]
    partitions = [p for topic, p in sender.partitions if topic == changelog]
    # Keys encoded as Faust encoded this table's changelog keys (JSON), so changelogs written
    # before the profile agent left Faust are read back.
    expected = [json.dumps(u).encode() for u in ("u1", "u2")]
    assert list(zip(keys, partitions, strict=True)) == list(zip(expected, [3, 1], strict=True))
    stored = streams.profiles.get(1, "u2")
    assert stored is not None and json.loads(stored)["history"][0]["item_id"] == "i1"


@run_async
async def test_bad_input_goes_to_dead_letter_while_good_events_flow(
    streams: StreamsApp, sender: RecordingSender
) -> None:
    missing_field = event(3)
    del missing_field["item_id"]
    records: list[tuple[bytes | None, bytes]] = [
        (b"u1", b"{not json"),
        (b"u1", encode(event(1))),
        (b"u1", encode(missing_field)),
        (b"u1", encode(event(4, kind="teleport"))),
        (b"u1", encode(event(5, item="no-such-item"))),
        (b"u1", encode({**event(6), "ts": "2300-01-01T00:00:00+00:00"})),
        (b"u1", encode({**event(7), "ts": "1970-01-02T00:00:00+00:00"})),
        (b"someone-else", encode(event(8))),
        (b"u1", encode(event(9, item="i2"))),
    ]
    await put_events(streams, records)

    rejected = dead_letters(sender)
    assert [d.error_type for d in rejected] == [
        "malformed_json",
        "invalid_fields",
        "unknown_event_type",
        "unknown_item",
        "implausible_timestamp",
        "implausible_timestamp",
        "invalid_fields",
    ]
    assert [d.offset for d in rejected] == [0, 2, 3, 4, 5, 6, 7]
    assert all(d.source_topic == "behavior-events" and d.stage == "streams" for d in rejected)
    assert base64.b64decode(rejected[0].raw_value_b64 or "") == b"{not json"
    assert "item_id" in rejected[1].reason
    assert "no-such-item" in rejected[3].reason
    assert "user_id" in rejected[6].reason and rejected[6].key == "someone-else"
    updates = [ProfileUpdate.model_validate_json(v) for v in sender.values("profile-updates")]
    assert [u.trigger_event_ids for u in updates] == [["e1"], ["e9"]]

    samples = {
        (s.labels.get("error_type"), s.value)
        for m in streams.registry.collect()
        if m.name == "relata_dead_letter"
        for s in m.samples
        if s.name == "relata_dead_letter_total"
    }
    assert ("implausible_timestamp", 2.0) in samples and ("malformed_json", 1.0) in samples


@run_async
async def test_an_event_whose_fold_raises_is_dead_lettered_and_the_others_fold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = profile_module._basket_context

    def failing_on_e2(state: Any, event: Any, kind: Any, config: Any) -> Any:
        if event.event_id == "e2":
            raise RuntimeError("fold bug")
        return real(state, event, kind, config)

    monkeypatch.setattr(profile_module, "_basket_context", failing_on_e2)
    sender = RecordingSender()
    streams = make_streams(tmp_path, sender, batch_max_events=3)
    await put_events(
        streams,
        [
            (b"u1", encode(event(1, item="i1"))),
            (b"u1", encode(event(2, item="i2"))),
            (b"u1", encode(event(3, item="i3"))),
        ],
    )
    rejected = dead_letters(sender)
    assert [(d.error_type, d.offset) for d in rejected] == [("processing_error", 1)]
    assert "RuntimeError: fold bug" in rejected[0].reason
    updates = [ProfileUpdate.model_validate_json(v) for v in sender.values("profile-updates")]
    assert [u.trigger_event_ids for u in updates] == [["e1", "e3"]]


@run_async
async def test_redelivered_event_is_counted_once(
    streams: StreamsApp, sender: RecordingSender
) -> None:
    await put_events(streams, [(b"u1", encode(event(1))), (b"u1", encode(event(1)))])
    assert len(sender.values("profile-updates")) == 1
    assert streams.registry.get_sample_value("relata_events_duplicate_total") == 1.0
    assert streams.registry.get_sample_value("relata_profile_updates_total") == 1.0


@run_async
async def test_associations_publish_related_items_for_co_purchases(
    streams: StreamsApp, sender: RecordingSender
) -> None:
    baskets = [("u1", "b1"), ("u2", "b2"), ("u3", "b3")]
    records = []
    n = 0
    for user, basket in baskets:
        for item in ("i1", "i2"):
            n += 1
            records.append(
                (user.encode(), encode(event(n, user=user, item=item, session_id=basket)))
            )
    await put_events(streams, records)
    inputs = association_inputs(streams, sender)

    async with streams.process_associations.test_context() as agent:
        for value in inputs:
            await agent.put(json.dumps([value]).encode(), partition=0)
    # The agent republishes a window's changed lists before its inputs are acknowledged.
    assert streams.registry.get_sample_value("relata_related_items_published_total") == 2

    published = {
        r.item_id: r
        for r in (RelatedItems.model_validate_json(v) for v in sender.values("related-items"))
    }
    assert set(published) == {"i1", "i2"}
    top = published["i1"].related[0]
    assert (top.item_id, top.kind, top.evidence.support) == ("i2", "bought_together", 3)
    assert "bought together in 3 baskets" in top.evidence.text
    # Nothing changed since: no republish.
    assert await association_agent(streams).flush_related() == 0
    assert streams.registry.get_sample_value("relata_association_updates_total") == len(inputs)
    assert streams.registry.get_sample_value("relata_related_items_published_total") == 2


@run_async
async def test_related_lists_never_show_retired_items(
    streams: StreamsApp, sender: RecordingSender
) -> None:
    records = []
    for n, (user, item) in enumerate(
        [(u, i) for u in ("u1", "u2", "u3") for i in ("i1", "i2", "i3")], start=1
    ):
        records.append((user.encode(), encode(event(n, user=user, item=item, session_id=user))))
    await put_events(streams, records)
    inputs = association_inputs(streams, sender)
    # i3 is retired before the lists are published.
    streams.catalog.set_items({"i1": ("Hair",), "i2": ("Hair",)})
    async with streams.process_associations.test_context() as agent:
        for value in inputs:
            await agent.put(json.dumps([value]).encode(), partition=0)
    published = {
        r.item_id: [n.item_id for n in r.related]
        for r in (RelatedItems.model_validate_json(v) for v in sender.values("related-items"))
    }
    # (i2 may appear once per relation kind: bought together, and next in the basket.)
    assert set(published["i1"]) == {"i2"} and set(published["i2"]) == {"i1"}
    # The statistics still hold i3 (it may come back), the HTTP list does not show it.
    assert "i3" in [r.item_id for r in streams.related_of("i1", kinds=("bought_together",)).related]  # type: ignore[union-attr]
    body = await related_body(streams, item_id="i1", k=5, kind="all", same_category=False)
    assert {r.item_id for r in body.related} == {"i2"}


@run_async
async def test_also_bought_is_served_alone_and_in_all(
    streams: StreamsApp, sender: RecordingSender
) -> None:
    # Three customers buy i1, then i2 in a later basket: i2 is also bought with i1.
    records = []
    n = 0
    for user in ("u1", "u2", "u3"):
        for item, basket in (("i1", f"{user}-a"), ("i2", f"{user}-b")):
            n += 1
            records.append(
                (user.encode(), encode(event(n, user=user, item=item, session_id=basket)))
            )
    await put_events(streams, records)
    async with streams.process_associations.test_context() as agent:
        for value in association_inputs(streams, sender):
            await agent.put(json.dumps([value]).encode(), partition=0)

    only = await related_body(streams, item_id="i2", k=5, kind="also_bought", same_category=False)
    assert [(r.item_id, r.kind) for r in only.related] == [("i1", "also_bought")]
    everything = await related_body(streams, item_id="i2", k=5, kind="all", same_category=False)
    assert ("i1", "also_bought") in {(r.item_id, r.kind) for r in everything.related}
    assert parse_related_query({"kind": "also_bought"})[1] == "also_bought"


@run_async
async def test_recommendations_table_keeps_latest_and_rejects_invalid(
    streams: StreamsApp, sender: RecordingSender
) -> None:
    def recommendation(item: str) -> bytes:
        return encode(
            {
                "user_id": "u1",
                "items": [
                    {
                        "item_id": item,
                        "score": 0.5,
                        "reasons": [
                            {
                                "source_item_id": "i1",
                                "kind": "similar",
                                "strength": 0.5,
                                "text": "t",
                            }
                        ],
                    }
                ],
                "generated_at": NOW.isoformat(),
                "model_name": "m",
                "model_version": "1",
                "strategy": "hybrid",
                "trigger_event_ids": ["e1"],
                "latency_ms": 3.0,
            }
        )

    async with streams.process_recommendations.test_context() as agent:
        await agent.put(recommendation("i2"), key=b"u1", partition=0)
        await agent.put(recommendation("i3"), key=b"u1", partition=0)
        await agent.put(b'{"user_id": "u1"}', key=b"u1", partition=0)
    stored = streams.recommendations.get("u1")
    assert stored is not None and json.loads(stored)["items"][0]["item_id"] == "i3"
    assert [d.error_type for d in dead_letters(sender)] == ["invalid_fields"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"k": "0"}, "k must be"),
        ({"k": "101"}, "k must be"),
        ({"k": "ten"}, "k must be"),
        ({"kind": "popular"}, "kind must be one of"),
        ({"same_category": "maybe"}, "same_category"),
    ],
)
def test_related_query_rejects_bad_parameters(query: dict[str, str], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_related_query(query)


def test_related_query_defaults() -> None:
    assert parse_related_query({}) == (10, "all", False)
    assert parse_related_query({"k": "100", "kind": "next_item", "same_category": "true"}) == (
        100,
        "next_item",
        True,
    )


@run_async
async def test_cold_start_item_gets_similar_items(tmp_path: Path) -> None:
    similar = FakeSimilar()
    app = build_streams(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        settings=StreamsSettings(web_port=0, data_dir=tmp_path),
        registry=CollectorRegistry(),
        similar=similar,
        sender=RecordingSender(),
        catalog=CatalogView(),
        follow_topics=False,
    )
    # sim-1 was retired: the store may still hold it, the related list never shows it.
    app.catalog.set_items(
        {**{i: ("Hair",) for i in ("sim-0", "sim-2", "sim-3")}, "cold": ("Beauty", "Hair")}
    )
    body = await related_body(app, item_id="cold", k=3, kind="all", same_category=True)
    assert [r.item_id for r in body.related] == ["sim-0", "sim-2", "sim-3"]
    assert body.item_count == 0.0 and body.similar_available
    assert similar.calls == [("cold", 6, ("Beauty", "Hair"))]
    only_assoc = await related_body(
        app, item_id="cold", k=3, kind="bought_together", same_category=False
    )
    assert only_assoc.related == [] and len(similar.calls) == 1


def test_catalog_view_honours_tombstones_and_unavailable() -> None:
    view = CatalogView()
    view.apply(b"a", encode({"item_id": "a", "categories": ["x"]}))
    view.apply(b"b", encode({"item_id": "b"}))
    view.apply(b"c", encode({"item_id": "c"}))
    view.apply(b"bad", b"{oops")
    view.apply(b"b", None)
    view.apply(b"c", encode({"item_id": "c", "available": False}))
    assert "a" in view and "b" not in view and "c" not in view and "bad" not in view
    assert view.categories("a") == ("x",)


def test_openapi_document_is_valid_openapi_3_1() -> None:
    document = openapi_document()
    validate(document)
    assert document["openapi"] == "3.1.0"
    params = document["paths"]["/items/{item_id}/related"]["get"]["parameters"]
    kind = next(p for p in params if p["name"] == "kind")
    assert kind["schema"]["enum"] == ["all", *vocabulary.relation_kinds()]
    assert "also_bought" in kind["schema"]["enum"]
    assert "RelatedItem" in document["components"]["schemas"]


def test_all_streams_metric_names_registered(streams: StreamsApp) -> None:
    names = {m.name for m in streams.registry.collect()}
    # prometheus_client strips the _total suffix of counters in `name`.
    assert names == {
        "relata_events_consumed",
        "relata_events_duplicate",
        "relata_erasures",
        "relata_dead_letter",
        "relata_profile_updates",
        "relata_event_processing_seconds",
        "relata_event_batch_size",
        "relata_association_updates",
        "relata_related_items_published",
        "relata_association_items",
        "relata_http_requests",
        "relata_consumer_lag_records",
        "relata_profiles_restored",
        "relata_rule_fallbacks",
    }


def test_rocksdb_store_without_binding_fails_fast(tmp_path: Path) -> None:
    import importlib.util

    from streams.app import StoreUnavailableError, check_store

    settings = StreamsSettings(store="rocksdb://", data_dir=tmp_path)
    if any(importlib.util.find_spec(n) for n in ("rocksdict", "rocksdb")):
        check_store(settings)  # a binding is installed: accepted
    else:
        with pytest.raises(StoreUnavailableError, match="rocksdict"):
            check_store(settings)
    check_store(StreamsSettings(store="memory://", data_dir=tmp_path))


@run_async
async def test_association_agent_batches_equal_one_by_one_statistics(
    tmp_path: Path, sender: RecordingSender
) -> None:
    streams = make_streams(tmp_path, sender, assoc_batch_window_s=0.01)
    records = []
    n = 0
    for b, items in enumerate([("i1", "i2", "i3"), ("i2", "i3"), ("i1", "i3", "cold"), ("i2",)]):
        user = f"u{b % 2}"
        for item in items:
            n += 1
            records.append(
                (user.encode(), encode(event(n, user=user, item=item, session_id=f"b{b}")))
            )
    await put_events(streams, records)
    inputs = association_inputs(streams, sender)
    assert len(inputs) >= 8

    async with streams.process_associations.test_context() as agent:
        for value in inputs:
            await agent.put(json.dumps([value]).encode(), partition=0, wait=False)
        async with asyncio.timeout(10):
            while streams.registry.get_sample_value("relata_association_updates_total") < len(
                inputs
            ):
                await asyncio.sleep(0.01)
    reference = AssociationIndex(streams.assoc_config)
    for value in inputs:
        reference.observe(AssociationInput.from_dict(value))
    live = {k: dict(streams.associations.get(k)) for k in reference.items}
    # The live records also carry, per behavior-events partition, the offset of the last
    # event folded into them.
    assert all(record.pop("applied") for record in live.values())
    assert live == reference.items
    last_source: dict[str, int] = {}
    for value in inputs:
        partition, offset = value["source"]
        last_source[f"e{partition}"] = max(last_source.get(f"e{partition}", -1), offset)
    totals, clock = association_agent(streams).association_clock()
    assert totals is not None and totals.pop("applied") == last_source
    assert (totals, clock) == (reference.totals, reference.last_ts)
    assert streams.registry.get_sample_value("relata_association_updates_total") == len(inputs)


def test_roles_split_agents_tables_and_routes_and_share_the_association_state(
    tmp_path: Path, sender: RecordingSender
) -> None:
    profiles = make_streams(tmp_path / "p", sender, role="profiles")
    associations = make_streams(tmp_path / "a", sender, role="associations")
    everything = make_streams(tmp_path / "all", sender)

    assert profiles.event_consumer is not None and profiles.process_associations is None
    assert profiles.profiles is not None and profiles.associations is None
    assert associations.process_associations is not None and associations.event_consumer is None
    assert associations.profiles is None and associations.recommendations is None
    # Both let the broker gather records; the latency path waits at most fetch_wait_ms for them.
    assert associations.app._fetch_min_bytes == 65536
    assert profiles.app._fetch_min_bytes == everything.app._fetch_min_bytes == 65536
    assert associations.app._fetch_max_wait_ms == profiles.app._fetch_max_wait_ms == 500
    events = profiles.event_consumer.consumer_config
    assert (events["fetch.min.bytes"], events["fetch.wait.max.ms"]) == (65536, 10)
    # Offsets are stored by the agent (after its outputs are acknowledged), never by librdkafka.
    assert events["enable.auto.offset.store"] is False
    # A rebalance moves (and so replays) only the partitions that change owner.
    assert events["partition.assignment.strategy"] == "cooperative-sticky"
    # One consumer group per role, and one of the profile agent's own ...
    assert profiles.app.conf.id == everything.app.conf.id == "relata-streams"
    assert associations.app.conf.id == "relata-streams-associations"
    assert events["group.id"] == "relata-streams-events"
    assert everything.event_consumer is not None
    assert everything.event_consumer.consumer_config["group.id"] == "relata-streams-events"
    # ... the association state in the same topics whichever role holds it ...
    for name in ("associations", "association_totals"):
        apart = getattr(associations, name).changelog_topic.get_topic_name()
        assert apart == getattr(everything, name).changelog_topic.get_topic_name()
    assert apart == "relata-streams-association-totals-changelog"
    # ... fed by the topic the profile agent produces to.
    assert profiles.topic_names[ASSOCIATION_INPUT] == associations.topic_names[ASSOCIATION_INPUT]
    # Each role serves the routes its tables answer.
    related, users = "/items/{item_id}/related", "/users/{user_id}/recommendations"
    assert users in profiles.app.web.views and related not in profiles.app.web.views
    assert related in associations.app.web.views and users not in associations.app.web.views
    probes = {"/healthz", "/readyz", "/livez"}
    assert {related, users, "/metrics"} | probes <= set(everything.app.web.views)
    # The probes watch the brokers, the outputs' acknowledgements and every consuming loop.
    watched = {watch.name for watch in everything.health.loops}
    assert watched == {"profile agent", "faust consumer"}
    assert {w.name for w in associations.health.loops} == {"faust consumer"}


@run_async
async def test_kill_restarted_association_agent_skips_redelivered_inputs_republishes_lists(
    tmp_path: Path, sender: RecordingSender
) -> None:
    streams = make_streams(tmp_path, sender, assoc_batch_window_s=0.01)
    records = []
    n = 0
    for b, items in enumerate([("i1", "i2"), ("i1", "i2", "i3"), ("i2", "i3"), ("i1", "i2")]):
        user = f"u{b}"
        for item in items:
            n += 1
            records.append(
                (user.encode(), encode(event(n, user=user, item=item, session_id=f"b{b}")))
            )
    await put_events(streams, records)
    messages = [json.loads(v) for v in sender.values(streams.topic_names[ASSOCIATION_INPUT])]
    async with streams.process_associations.test_context() as agent:
        for message in messages:  # offsets 0, 1, ...
            await agent.put(json.dumps(message).encode(), partition=0)
        folded = len(association_inputs(streams, sender))
        async with asyncio.timeout(10):
            while streams.registry.get_sample_value("relata_association_updates_total") < folded:
                await asyncio.sleep(0.01)
    state = json.dumps(
        [dict(streams.associations.items()), association_agent(streams).association_clock()],
        sort_keys=True,
    )
    # Each record holds, per behavior-events partition, the last event whose input touched it.
    touching_i1 = [
        value["source"]
        for message in messages
        for value in message
        if any(u[0] == "i1" for u in input_updates(AssociationInput.from_dict(value)))
    ]
    assert json.loads(state)[0]["i1"]["applied"] == {f"e{touching_i1[-1][0]}": touching_i1[-1][1]}

    # The process was killed after the changelog records, before the offsets were committed:
    # a new process (its state recovered from the changelog) gets the last messages again.
    restarted = replace(association_agent(streams), published={}, dirty=set())
    published_before = len(sender.values("related-items"))
    redelivered = range(len(messages) // 2, len(messages))
    await restarted.handle_association_batch(
        [
            Record(None, json.dumps(messages[k]).encode(), "association-input", 0, k, 0.0)
            for k in redelivered
        ]
    )
    assert (
        json.dumps(
            [dict(streams.associations.items()), restarted.association_clock()], sort_keys=True
        )
        == state
    )
    # Their items' lists are republished: the crash may have come before they were.
    assert await restarted.flush_related() == 2
    lists = [RelatedItems.model_validate_json(v) for v in sender.values("related-items")]
    assert {r.item_id for r in lists[published_before:]} == {"i1", "i2"}


def cursor_records(*offsets: int, partition: int = 0) -> list[Record]:
    return [Record(None, b"[]", "association-input", partition, o, 0.0) for o in offsets]


def test_input_cursor_keeps_each_partition_a_prefix_and_asks_to_read_again_once() -> None:
    cursor = InputCursor()
    # The first message seen (the committed offset) and those after it, in order.
    kept, rewind = cursor.admit(cursor_records(7, 8, 9))
    assert [r.offset for r in kept] == [7, 8, 9] and rewind == {}
    # Re-delivered after a seek back to an earlier commit: folded again (the fold skips them).
    kept, rewind = cursor.admit(cursor_records(8, 9, 10))
    assert [r.offset for r in kept] == [8, 9, 10] and rewind == {}
    # A message past the next one (fetched before a rebalance, or one went missing): held
    # back with everything after it, and the partition is read again from the next offset,
    # as long as batches show the gap (copies fetched before the seek may still come first).
    kept, rewind = cursor.admit(cursor_records(14, 15) + cursor_records(3, partition=1))
    assert [(r.partition, r.offset) for r in kept] == [(1, 3)] and rewind == {0: 11}
    assert cursor.admit(cursor_records(16)) == ([], {0: 11})
    # The messages read again, behind a stale one still in the batch.
    kept, rewind = cursor.admit(cursor_records(17, 11, 12, 13, 14, 15, 16))
    assert [r.offset for r in kept] == [11, 12, 13, 14, 15, 16] and rewind == {0: 11}
    kept, rewind = cursor.admit(cursor_records(17))
    assert [r.offset for r in kept] == [17] and rewind == {}
    # A later gap asks again.
    assert cursor.admit(cursor_records(20)) == ([], {0: 18})
    # Where retention deleted the gap, the partition goes on from its first offset.
    cursor.skip_to(0, 19)
    kept, _ = cursor.admit(cursor_records(19, 20))
    assert [r.offset for r in kept] == [19, 20]


@run_async
async def test_association_input_ahead_of_the_fold_is_held_back_and_read_again(
    tmp_path: Path, sender: RecordingSender
) -> None:
    """A message handed over before earlier ones (records fetched before a rebalance and
    delivered after the seek back to the commit) is not folded: folded first, it would move the
    watermarks of the records it touches past the earlier messages, which those records would
    then skip as already held. The agent reads the partition again from the first message it
    lacks; the statistics equal a fold of every input once, in order."""
    streams = make_streams(tmp_path, sender, assoc_batch_window_s=0.01)
    records = []
    n = 0
    for b, items in enumerate([("i1", "i2", "i3"), ("i2", "i3"), ("i1", "i3"), ("i1", "i2")]):
        user = f"u{b % 2}"
        for item in items:
            n += 1
            records.append(
                (user.encode(), encode(event(n, user=user, item=item, session_id=f"b{b}")))
            )
    await put_events(streams, records)
    inputs = association_inputs(streams, sender)
    assert len(inputs) >= 6
    # One input per message: message k at offset k.
    messages = [json.dumps([value]).encode() for value in inputs]
    stale = len(messages) - 1
    sought: list[tuple[Any, int]] = []
    consumer = streams.app.consumer

    async def earliest_offsets(*tps: Any) -> dict[Any, int]:
        return {tp: 0 for tp in tps}

    async def seek(tp: Any, offset: int) -> None:
        sought.append((tp, offset))

    consumer.earliest_offsets = earliest_offsets
    consumer.seek = seek

    def folded() -> float:
        return streams.registry.get_sample_value("relata_association_updates_total") or 0.0

    async with streams.process_associations.test_context() as agent:
        for offset in range(2):
            await agent.put(messages[offset], partition=0, wait=False)
        await settled(lambda: folded() == 2)
        # The last message, ahead of the others: held back, and the partition read again ...
        agent.sent_offset = stale
        await agent.put(messages[stale], partition=0, wait=False)
        await settled(lambda: bool(sought))
        assert [(tp.topic, tp.partition, offset) for tp, offset in sought] == [
            (streams.topic_names[ASSOCIATION_INPUT], 0, 2)
        ]
        assert folded() == 2
        # ... from offset 2 (what the seek does in a worker).
        agent.sent_offset = 2
        for offset in range(2, len(messages)):
            await agent.put(messages[offset], partition=0, wait=False)
        await settled(lambda: folded() == len(inputs))
    reference = AssociationIndex(streams.assoc_config)
    for value in inputs:
        reference.observe(AssociationInput.from_dict(value))
    live = {k: dict(streams.associations.get(k)) for k in reference.items}
    assert all(record.pop("applied") for record in live.values())
    assert live == reference.items
    assert len(sought) == 1
