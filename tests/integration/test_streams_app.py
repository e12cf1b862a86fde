"""The stream processor against the real embedded Kafka: events in, profile updates,
dead letters, related items and HTTP out; statistics survive a restart via the changelogs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from confluent_kafka import Consumer, Producer
from openapi_spec_validator import validate

from relata.cli.run_streams import RunningStreams, VectorStoreSimilar, start_streams_in_thread
from relata.runtime.kafka_broker import free_port
from schemas.messages import DeadLetter, ProfileUpdate, RelatedItems
from schemas.settings import KafkaSettings, StreamsSettings
from schemas.topics import ALL_TOPICS

pytestmark = pytest.mark.integration

# Upper bound for a record to show up; a failure names what was missing, it is not a latency test.
WAIT_S = 60.0
NOW = datetime.now(UTC).replace(microsecond=0)
ITEMS = ["i1", "i2", "i3", "i4"]


def streams_settings(tmp_path: Path, unique_id: str) -> StreamsSettings:
    return StreamsSettings(
        app_id=f"streams-{unique_id}",
        data_dir=tmp_path / "faust",
        web_port=free_port(),
        session_timeout_s=3.0,
        heartbeat_interval_s=0.5,
    )


def producer(kafka: KafkaSettings) -> Producer:
    # murmur2 like Java clients and Faust, so HTTP routing agrees with record placement.
    return Producer(kafka.librdkafka_producer_config())


def publish(
    kafka: KafkaSettings, topic: str, records: list[tuple[bytes | None, bytes | None]]
) -> None:
    p = producer(kafka)
    errors: list[object] = []
    for key, value in records:
        p.produce(
            kafka.topic(topic),
            key=key,
            value=value,
            on_delivery=lambda err, _msg: errors.append(err) if err is not None else None,
        )
    assert p.flush(30) == 0
    assert not errors, f"records to {topic} not delivered: {errors[:3]}"


def event(n: int, user: str, item: str, basket: str, kind: str = "purchase") -> bytes:
    data = {
        "event_id": f"e{n}",
        "user_id": user,
        "item_id": item,
        "event_type": kind,
        "ts": (NOW + timedelta(seconds=n)).isoformat(),
        "session_id": basket,
    }
    return json.dumps(data).encode()


def catalog(kafka: KafkaSettings) -> None:
    """Create the declared topics (clients never create one), then publish the catalog."""
    from relata.runtime.topics import ensure_topics

    ensure_topics(kafka, ALL_TOPICS)
    records: list[tuple[bytes | None, bytes | None]] = [
        (
            i.encode(),
            json.dumps({"item_id": i, "title": f"Item {i}", "categories": ["Hair"]}).encode(),
        )
        for i in ITEMS
    ]
    records.append((b"retired", json.dumps({"item_id": "retired"}).encode()))
    records.append((b"retired", None))  # a tombstone retires it again
    publish(kafka, "item-catalog", records)


def co_purchases(kafka: KafkaSettings) -> None:
    """Three baskets holding i1 and i2 (and i3 in the first): i1-i2 support 3."""
    records: list[tuple[bytes | None, bytes | None]] = []
    n = 0
    for u in range(3):
        user = f"u{u}"
        items = ["i1", "i2", "i3"] if u == 0 else ["i1", "i2"]
        for item in items:
            n += 1
            records.append((user.encode(), event(n, user, item, f"basket-{u}")))
    publish(kafka, "behavior-events", records)


class TopicReader:
    """Reads topics from the beginning with a consumer group of its own."""

    def __init__(self, kafka: KafkaSettings, topics: list[str], group: str) -> None:
        self._consumer = Consumer(
            {
                **kafka.librdkafka_config(),
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self._consumer.subscribe([kafka.topic(t) for t in topics])
        self._prefix = kafka.topic_prefix
        self.records: dict[str, list[tuple[bytes | None, bytes]]] = {t: [] for t in topics}

    def until(self, done: Callable[[TopicReader], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done(self):
            if time.monotonic() > deadline:
                counts = {t: len(r) for t, r in self.records.items()}
                pytest.fail(f"not seen within {WAIT_S:.0f} s: {what}; records so far: {counts}")
            message = self._consumer.poll(0.2)
            if message is None or message.error():
                continue
            topic = message.topic()[len(self._prefix) :]
            self.records[topic].append((message.key(), message.value()))

    def values(self, topic: str) -> list[bytes]:
        return [value for _, value in self.records[topic]]

    def close(self) -> None:
        self._consumer.close()


@pytest.fixture
def reader(kafka_settings: KafkaSettings, unique_id: str) -> Iterator[TopicReader]:
    r = TopicReader(
        kafka_settings, ["profile-updates", "dead-letter", "related-items"], f"reader-{unique_id}"
    )
    yield r
    r.close()


def latest_related(reader: TopicReader) -> dict[str, RelatedItems]:
    latest: dict[str, RelatedItems] = {}
    for value in reader.values("related-items"):
        related = RelatedItems.model_validate_json(value)
        latest[related.item_id] = related
    return latest


def folded(reader: TopicReader) -> int:
    """Events folded so far: a profile update names every event it coalesced."""
    return sum(
        len(ProfileUpdate.model_validate_json(v).trigger_event_ids)
        for v in reader.values("profile-updates")
    )


def support(related: RelatedItems | dict[str, Any], partner: str) -> int | None:
    items = related.related if isinstance(related, RelatedItems) else related["related"]
    for r in items:
        r = r.model_dump() if not isinstance(r, dict) else r
        if r["item_id"] == partner and r["kind"] == "bought_together":
            return int(r["evidence"]["support"])
    return None


def start(
    kafka: KafkaSettings, settings: StreamsSettings, similar: VectorStoreSimilar | None = None
) -> RunningStreams:
    return start_streams_in_thread(
        kafka=kafka, settings=settings, similar=similar, ready_timeout_s=120
    )


def edge_similar(path: Path) -> VectorStoreSimilar:
    """A real embedded Qdrant (qdrant-edge) holding vectors for ITEMS: i4 is close to i1."""
    from workers.edge_store import EdgeVectorStore

    store = EdgeVectorStore(path)
    store.ensure_collection(4)
    vectors = np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0.9, 0.1, 0, 0]], dtype=np.float32
    )
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    payloads = [
        {"categories": ["Hair"]},
        {"categories": ["Hair"]},
        {"categories": ["Nails"]},
        {"categories": ["Hair"]},
    ]
    store.upsert(ITEMS, vectors, payloads)
    return VectorStoreSimilar(store)


def test_events_flow_to_profile_updates_dead_letters_related_items_and_http(
    kafka_settings: KafkaSettings, unique_id: str, tmp_path: Path, reader: TopicReader
) -> None:
    kafka = kafka_settings
    settings = streams_settings(tmp_path, unique_id)
    from relata.runtime.topics import ensure_topics
    from schemas.topics import ALL_TOPICS

    ensure_topics(kafka, ALL_TOPICS)
    catalog(kafka)
    with start(kafka, settings, edge_similar(tmp_path / "qdrant")) as running:
        co_purchases(kafka)
        publish(
            kafka,
            "behavior-events",
            [
                (b"u9", b"{broken"),
                (b"u9", event(100, "u9", "no-such-item", "b9")),
                (b"u9", event(101, "u9", "retired", "b9")),
                (b"u9", json.dumps({"event_id": "x", "user_id": "u9"}).encode()),
                (b"u9", event(102, "u9", "i4", "b9", kind="view")),
            ],
        )
        reader.until(
            lambda r: folded(r) >= 8 and len(r.values("dead-letter")) >= 4,
            "8 events folded into profile updates and 4 dead letters",
        )
        updates = [ProfileUpdate.model_validate_json(v) for v in reader.values("profile-updates")]
        assert {u.user_id for u in updates} == {"u0", "u1", "u2", "u9"}
        assert all(u.source_ts_ms > 0 for u in updates)
        assert all(
            key == value_user.encode()
            for (key, _), value_user in zip(
                reader.records["profile-updates"], [u.user_id for u in updates], strict=True
            )
        )
        letters = [DeadLetter.model_validate_json(v) for v in reader.values("dead-letter")]
        assert sorted(d.error_type for d in letters) == [
            "invalid_fields",
            "malformed_json",
            "unknown_item",
            "unknown_item",
        ]
        assert all(
            d.source_topic == kafka.topic("behavior-events") and d.offset >= 0 for d in letters
        )

        # Both directions are published, in no guaranteed order: wait for both.
        reader.until(
            lambda r: all(
                (rel := latest_related(r).get(a)) is not None and support(rel, b) == 3
                for a, b in (("i1", "i2"), ("i2", "i1"))
            ),
            "related-items for i1 and i2, each bought together with the other in 3 baskets",
        )

        base = running.url
        assert base is not None
        with httpx.Client(base_url=base, timeout=30) as http:
            ok = http.get("/items/i1/related", params={"kind": "bought_together", "k": 5})
            assert ok.status_code == 200
            body = ok.json()
            assert body["kind"] == "bought_together" and support(body, "i2") == 3
            assert body["similar_available"] is True
            assert [r["item_id"] for r in body["related"]][:1] == ["i2"]

            missing = http.get("/items/no-such-item/related")
            assert missing.status_code == 404 and "no-such-item" in missing.json()["error"]
            assert http.get("/items/retired/related").status_code == 404
            assert http.get("/items/i1/related", params={"k": 0}).status_code == 400
            bad_kind = http.get("/items/i1/related", params={"kind": "nope"})
            assert bad_kind.status_code == 400 and "kind must be one of" in bad_kind.json()["error"]
            # Cold start: i4 has no purchases, yet has similar items (its neighbour i1 first).
            cold = http.get("/items/i4/related", params={"kind": "similar", "k": 2}).json()
            assert [r["item_id"] for r in cold["related"]] == ["i1", "i2"]
            assert (
                cold["related"][0]["kind"] == "similar"
                and cold["related"][0]["evidence"]["cosine"] > 0.9
            )
            everything = http.get("/items/i1/related", params={"kind": "all", "k": 3}).json()
            kinds = {r["kind"] for r in everything["related"]}
            # Meaning and behaviour together (a basket's fill order also teaches next_item).
            assert (
                {"similar", "bought_together"}
                <= kinds
                <= {
                    "similar",
                    "bought_together",
                    "next_item",
                }
            )

            document = http.get("/openapi.json")
            assert document.status_code == 200
            validate(document.json())
            health = http.get("/healthz").json()
            assert health["status"] == "ok" and health["ready"] and health["live"]
            assert health["catalog_ready"] and health["catalog_items"] == len(ITEMS)
            assert health["broker_reachable"] and health["problems"] == []
            assert http.get("/readyz").json() == health
            assert http.get("/livez").status_code == 200

            assert http.get("/users/u0/recommendations").status_code == 404
            recommendation = {
                "user_id": "u0",
                "items": [
                    {
                        "item_id": "i4",
                        "score": 0.7,
                        "reasons": [
                            {
                                "source_item_id": "i1",
                                "kind": "similar",
                                "strength": 0.7,
                                "text": "t",
                            }
                        ],
                    }
                ],
                "generated_at": NOW.isoformat(),
                "model_name": "all-MiniLM-L6-v2",
                "model_version": "1",
                "strategy": "hybrid",
                "trigger_event_ids": ["e1"],
                "latency_ms": 5.0,
            }
            publish(kafka, "recommendations", [(b"u0", json.dumps(recommendation).encode())])
            deadline = time.monotonic() + WAIT_S
            got = http.get("/users/u0/recommendations")
            while got.status_code == 404 and time.monotonic() < deadline:
                time.sleep(0.2)
                got = http.get("/users/u0/recommendations")
            assert got.status_code == 200 and got.json()["items"][0]["item_id"] == "i4"
            # Per request: a list published without a pool re-ranks its own items.
            reranked = http.get("/users/u0/recommendations", params={"k": 1, "diversity": 0.5})
            assert reranked.status_code == 200 and reranked.json()["items"][0]["item_id"] == "i4"
            unmatched = http.get("/users/u0/recommendations", params={"brand": "nobody"}).json()
            assert unmatched["fallbacks"] == ["request_filters_removed_every_candidate"]
            bad = http.get("/users/u0/recommendations", params={"diversity": "2"})
            assert bad.status_code == 400 and "diversity" in bad.json()["detail"]

            metrics = http.get("/metrics").text
            assert 'relata_events_consumed_total{event_type="purchase"} 7.0' in metrics
            assert (
                'relata_dead_letter_total{error_type="unknown_item",stage="streams"} 2.0' in metrics
            )
            assert "relata_event_processing_seconds_bucket" in metrics
            assert 'relata_rule_fallbacks_total{stage="request_filters"} 1.0' in metrics


def test_restart_recovers_association_statistics_from_changelog(
    kafka_settings: KafkaSettings, unique_id: str, tmp_path: Path, reader: TopicReader
) -> None:
    kafka = kafka_settings
    settings = streams_settings(tmp_path, unique_id)
    from relata.runtime.topics import ensure_topics
    from schemas.topics import ALL_TOPICS

    ensure_topics(kafka, ALL_TOPICS)
    catalog(kafka)

    def related_i1(running: RunningStreams) -> dict[str, Any]:
        assert running.url is not None
        response = httpx.get(f"{running.url}/items/i1/related", params={"kind": "all"}, timeout=30)
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        return body

    with start(kafka, settings) as first:
        co_purchases(kafka)
        reader.until(
            lambda r: (rel := latest_related(r).get("i1")) is not None and support(rel, "i2") == 3,
            "related-items for i1 before the restart",
        )
        before = related_i1(first)
        assert first.url is not None
        # No vector store given: `similar` comes from the similar-items topic (empty here).
        no_store = httpx.get(
            f"{first.url}/items/i1/related", params={"kind": "similar"}, timeout=30
        )
        assert no_store.status_code == 200
        assert no_store.json()["similar_available"] is True and no_store.json()["related"] == []
    assert support(before, "i2") == 3

    # A new app (new process state, new data dir): the memory store is rebuilt from the
    # changelog topics only.
    second_settings = settings.model_copy(update={"data_dir": tmp_path / "faust-2"})
    with start(kafka, second_settings) as second:
        after = related_i1(second)
        assert after["item_count"] == pytest.approx(before["item_count"])
        assert [(r["item_id"], r["kind"], r["evidence"]["support"]) for r in after["related"]] == [
            (r["item_id"], r["kind"], r["evidence"]["support"]) for r in before["related"]
        ]
        # New behaviour continues from the recovered counts (a 4th basket: support 4).
        publish(
            kafka,
            "behavior-events",
            [
                (user.encode(), event(n + offset, user, item, f"late-{user}"))
                for n, user in ((600, "u7"), (700, "u8"))
                for offset, item in enumerate(("i1", "i2"))
            ],
        )
        # The table keeps counting from the recovered state (related-items is republished only
        # on a material change of the list, so read the live table over HTTP).
        deadline = time.monotonic() + WAIT_S
        while support(related_i1(second), "i2") != 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert support(related_i1(second), "i2") == 5


def test_a_rejoin_asked_for_by_the_rebalance_watch_restores_the_tables_in_place(
    kafka_settings: KafkaSettings, unique_id: str, tmp_path: Path, reader: TopicReader
) -> None:
    """What `RebalanceWatch` does to a stuck rebalance, on a live app: the group rebalances
    (a new generation), the tables are restored from their changelogs in the same process,
    and the association statistics go on from where they were."""
    from streams.rebalance_watch import request_rejoin

    kafka = kafka_settings
    catalog(kafka)
    with start(kafka, streams_settings(tmp_path, unique_id)) as running:
        co_purchases(kafka)
        reader.until(
            lambda r: (rel := latest_related(r).get("i1")) is not None and support(rel, "i2") == 3,
            "related-items for i1 before the rejoin",
        )
        app = running.streams.app
        generation = app.consumer_generation_id
        assert running.streams.rebalances is not None and not app.rebalancing
        request_rejoin(app)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and (
            app.consumer_generation_id == generation or app.rebalancing
        ):
            time.sleep(0.1)
        assert app.consumer_generation_id > generation and not app.rebalancing
        assert running.url is not None

        def i1_i2() -> int | None:
            url = f"{running.url}/items/i1/related"
            return support(httpx.get(url, params={"kind": "all"}, timeout=30).json(), "i2")

        assert i1_i2() == 3  # restored, neither lost nor counted twice
        publish(
            kafka,
            "behavior-events",
            [(b"u9", event(900 + n, "u9", item, "late-u9")) for n, item in enumerate(("i1", "i2"))],
        )
        # The table goes on from the restored state (read over HTTP: related-items is
        # republished only on a material change of the list).
        while i1_i2() != 4 and time.monotonic() < deadline + WAIT_S:
            time.sleep(0.2)
        assert i1_i2() == 4


def test_restart_restores_profiles_from_the_changelog_and_resumes_after_committed_events(
    kafka_settings: KafkaSettings, unique_id: str, tmp_path: Path, reader: TopicReader
) -> None:
    """The profile agent's own table: a new process rebuilds a user's profile from the
    changelog when it is assigned the partition, and starts after the committed events."""
    kafka = kafka_settings
    catalog(kafka)
    settings = streams_settings(tmp_path, unique_id)

    def updates_of(user: str) -> list[ProfileUpdate]:
        updates = [ProfileUpdate.model_validate_json(v) for v in reader.values("profile-updates")]
        return [u for u in updates if u.user_id == user]

    with start(kafka, settings):
        publish(
            kafka,
            "behavior-events",
            [(b"u0", event(1, "u0", "i1", "b1")), (b"u0", event(2, "u0", "i2", "b1"))],
        )
        reader.until(lambda r: folded(r) >= 2, "both events folded before the restart")
    # A second process (fresh memory store, same app id and so the same group and changelog).
    restarted = settings.model_copy(update={"data_dir": tmp_path / "second"})
    with start(kafka, restarted):
        publish(kafka, "behavior-events", [(b"u0", event(3, "u0", "i3", "b1"))])
        reader.until(lambda r: "e3" in updates_of("u0")[-1].trigger_event_ids, "e3 folded")
    latest = updates_of("u0")[-1]
    # The history before the restart came back from the changelog ...
    assert [h.item_id for h in latest.history] == ["i3", "i2", "i1"]
    # ... and no event was folded twice: the committed offsets were honoured.
    triggers = [t for u in updates_of("u0") for t in u.trigger_event_ids]
    assert sorted(triggers) == ["e1", "e2", "e3"]


def test_a_second_worker_takes_over_partitions_with_their_profiles(
    kafka_settings: KafkaSettings, unique_id: str, tmp_path: Path, reader: TopicReader
) -> None:
    """Two profile workers in one group: the partitions that move to the newcomer arrive with
    their profiles (replayed from the changelog), and the first keeps the others."""
    kafka = kafka_settings
    catalog(kafka)
    settings = streams_settings(tmp_path, unique_id).model_copy(update={"role": "profiles"})
    users = [f"u{n}" for n in range(8)]  # murmur2 spreads them over both partitions

    def latest(user: str) -> ProfileUpdate | None:
        updates = [ProfileUpdate.model_validate_json(v) for v in reader.values("profile-updates")]
        mine = [u for u in updates if u.user_id == user]
        return mine[-1] if mine else None

    with start(kafka, settings) as first:
        publish(
            kafka,
            "behavior-events",
            [(u.encode(), event(n, u, "i1", f"b-{u}")) for n, u in enumerate(users)],
        )
        reader.until(lambda r: folded(r) >= len(users), "every user's first event folded")
        second_settings = settings.model_copy(
            update={"data_dir": tmp_path / "second", "web_port": free_port()}
        )
        with start(kafka, second_settings) as second:
            consumers = (first.streams.event_consumer, second.streams.event_consumer)
            assert consumers[0] is not None and consumers[1] is not None
            deadline = time.monotonic() + WAIT_S
            while not (first.streams.profiles.partitions and second.streams.profiles.partitions):
                assert time.monotonic() < deadline, "the partitions were not shared out"
                time.sleep(0.2)
            assert first.streams.profiles.partitions.isdisjoint(second.streams.profiles.partitions)
            moved = second.streams.profiles.partitions
            publish(
                kafka,
                "behavior-events",
                [(u.encode(), event(100 + n, u, "i2", f"b-{u}")) for n, u in enumerate(users)],
            )
            reader.until(
                lambda r: all(
                    (seen := latest(u)) is not None and seen.last_item_id == "i2" for u in users
                ),
                "every user's second event folded",
            )
    # Every profile, on whichever worker, holds both events: the moved ones came with theirs.
    for user in users:
        update = latest(user)
        assert update is not None
        assert [h.item_id for h in update.history] == ["i2", "i1"], user
    restored = second.streams.registry.get_sample_value("relata_profiles_restored_total")
    assert restored is not None and restored >= 1 and moved


def test_rocksdb_store_folds_profiles_and_keeps_them_on_disk(
    kafka_settings: KafkaSettings, unique_id: str, reader: TopicReader, tmp_path: Path
) -> None:
    """`RELATA_STREAMS_STORE=rocksdb://`: the same agents on RocksDB tables (rocksdict)."""
    settings = streams_settings(tmp_path, unique_id).model_copy(update={"store": "rocksdb://"})
    catalog(kafka_settings)
    with start(kafka_settings, settings):
        co_purchases(kafka_settings)
        reader.until(
            lambda r: folded(r) >= 7,
            "every valid event folded on the RocksDB store",
        )
    updates = [ProfileUpdate.model_validate_json(v) for v in reader.values("profile-updates")]
    u0 = [u for u in updates if u.user_id == "u0"][-1]
    assert [h.item_id for h in u0.history] == ["i3", "i2", "i1"]
    # The tables really lived in RocksDB: Faust keeps one database directory per table partition.
    rocks_dirs = [p for p in (tmp_path / "faust").rglob("*.db") if p.is_dir()]
    assert any("profiles" in p.name for p in rocks_dirs), sorted(p.name for p in rocks_dirs)
