"""Recommender: coalescing, micro-batches, exclusions, dead letters, user-vector modes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from kafkaio.producer import DeliveryError
from schemas.messages import ProfileUpdate, RelatedItems
from schemas.settings import RecommenderSettings
from tests.unit.worker_fakes import FakeConsumer, FakeEncoder, FakeProducer
from workers.client_store import ClientVectorStore
from workers.lookups import ItemCache, RelatedIndex
from workers.metrics import WorkerMetrics
from workers.micro_batch import RecommenderTopics, coalesce
from workers.ranking import BlendWeights, popularity_prior
from workers.recommender import RELATED_PER_POLL, Recommender
from workers.vector_store import ModelIdentity, ModelMismatchError

TOPICS = RecommenderTopics(
    profile_updates="profile-updates",
    related_items="related-items",
    recommendations="recommendations",
    dead_letter="dead-letter",
)
NOW = 1_700_000_000.0
TS = "2024-01-01T00:00:00+00:00"

CATALOG = {
    "lip1": "red matte lipstick",
    "lip2": "pink matte lipstick",
    "lip3": "nude matte lipstick",
    "lip4": "coral matte lipstick",
    "sh1": "dry shampoo volume",
    "sh2": "clarifying shampoo volume",
    "sh3": "moisture shampoo volume",
    "nail": "nail polish remover",
}


def _history(*items: str) -> list[dict[str, Any]]:
    return [
        {"item_id": i, "weight": 8.0, "last_event_type": "purchase", "last_ts": TS, "count": 1}
        for i in items
    ]


def _update(
    user: str, *items: str, triggers: list[str] | None = None, ts: int = 1000
) -> dict[str, Any]:
    return {
        "user_id": user,
        "history": _history(*items),
        "last_event_type": "purchase",
        "last_item_id": items[0],
        "trigger_event_ids": triggers or [f"{user}-e"],
        "source_ts_ms": int(NOW * 1000) - ts,
        "updated_at": TS,
    }


def _related(item: str, *others: str, count: float = 5.0) -> dict[str, Any]:
    return {
        "item_id": item,
        "item_count": count,
        "related": [
            {
                "item_id": o,
                "kind": "bought_together",
                "score": 3.0,
                "evidence": {"support": 4, "lift": 3.0, "text": "bought together in 4 baskets"},
            }
            for o in others
        ],
        "updated_at": TS,
    }


@pytest.fixture
def store() -> Iterator[ClientVectorStore]:
    s = ClientVectorStore(collection="items", path=":memory:")
    s.ensure_collection(FakeEncoder.dim)
    ids = list(CATALOG)
    s.upsert(
        ids, FakeEncoder().encode([CATALOG[i] for i in ids]), [{"title": CATALOG[i]} for i in ids]
    )
    yield s
    s.close()


class Harness:
    def __init__(self, store: ClientVectorStore, **settings: Any) -> None:
        self.consumer = FakeConsumer("profile-updates")
        self.related = FakeConsumer("related-items")
        self.producer = FakeProducer()
        self.encoder = FakeEncoder()
        self.metrics = WorkerMetrics.create(CollectorRegistry())
        self.store = store
        defaults: dict[str, Any] = {
            "k": 3,
            "candidates": 10,
            "max_batch": 100,
            "max_wait_ms": 1,
            "commit_interval_ms": 0,  # every batch, unless a test says otherwise
        }
        self.recommender = Recommender(
            consumer=self.consumer,
            related_consumer=self.related,
            producer=self.producer,
            encoder=self.encoder,
            store=store,
            metrics=self.metrics,
            topics=TOPICS,
            settings=RecommenderSettings(**{**defaults, **settings}),
            clock=lambda: NOW,
        )

    def recs(self) -> dict[str, dict[str, Any]]:
        return {r["user_id"]: r for r in self.producer.values("recommendations")}


def test_coalesce_keeps_latest_and_unions_triggers() -> None:
    updates = [
        ProfileUpdate.model_validate(_update("u", "lip1", triggers=["e1"], ts=50)),
        ProfileUpdate.model_validate(_update("v", "sh1", triggers=["f1"])),
        ProfileUpdate.model_validate(_update("u", "lip2", "lip1", triggers=["e2", "e1"], ts=10)),
    ]
    users, coalesced = coalesce(updates)
    assert coalesced == 1
    assert list(users) == ["u", "v"]
    assert users["u"].update.last_item_id == "lip2"
    assert users["u"].trigger_event_ids == ["e1", "e2"]
    assert users["u"].source_ts_ms == int(NOW * 1000) - 50


def test_pooled_recommendations_exclude_history_and_explain(store: ClientVectorStore) -> None:
    h = Harness(store)
    h.consumer.add_json(_update("u", "lip1", "lip2", ts=40), key="u")
    h.consumer.add_json(_update("v", "sh1"), key="v")
    result = h.recommender.poll_once()
    assert (result.records, result.users, result.published) == (2, 2, 2)
    recs = h.recs()
    u_items = [i["item_id"] for i in recs["u"]["items"]]
    assert u_items[:2] and set(u_items[:2]) <= {"lip3", "lip4"}
    assert not {"lip1", "lip2"} & set(u_items)
    assert [i["item_id"] for i in recs["v"]["items"]][:2] in (["sh2", "sh3"], ["sh3", "sh2"])
    for rec in recs.values():
        history = {"u": {"lip1", "lip2"}, "v": {"sh1"}}[rec["user_id"]]
        for item in rec["items"]:
            assert item["reasons"]
            assert all(r["source_item_id"] in history for r in item["reasons"])
    # Vector hits name the closest history item, with its cosine.
    similar = [r for i in recs["u"]["items"] for r in i["reasons"] if r["kind"] == "similar"]
    assert similar
    assert any("cosine" in r["text"] for r in similar)
    assert recs["u"]["latency_ms"] == pytest.approx(40.0)
    assert recs["u"]["strategy"] == "hybrid/pooled"
    assert recs["u"]["model_name"] == "fake"
    assert h.encoder.calls == []  # pooled vectors come from the store, not the encoder
    assert h.consumer.commits == [2]
    assert h.metrics.recommendations_published._value.get() == 2


def test_unavailable_items_are_never_recommended(store: ClientVectorStore) -> None:
    store.set_available(["lip3", "sh2"], False)
    h = Harness(store)
    # sh2 also arrives as behaviour evidence: it must still be dropped.
    h.related.add_json(_related("lip1", "sh2", "nail"), key="lip1")
    h.consumer.add_json(_update("u", "lip1", "lip2"), key="u")
    h.recommender.poll_once()
    items = [i["item_id"] for i in h.recs()["u"]["items"]]
    assert "lip3" not in items
    assert "sh2" not in items
    assert "nail" in items


def test_related_items_evidence_names_the_history_item(store: ClientVectorStore) -> None:
    h = Harness(store, strategy="hybrid")
    h.related.add_json(_related("sh1", "nail"), key="sh1")
    h.related.add(b"{broken", key=b"x")
    h.consumer.add_json(_update("v", "sh1"), key="v")
    h.recommender.poll_once()
    nail = next(i for i in h.recs()["v"]["items"] if i["item_id"] == "nail")
    reason = nail["reasons"][0]
    assert reason["kind"] == "bought_together"
    assert reason["source_item_id"] == "sh1"
    # The evidence travels as fields; the text names the source once, by its title.
    assert reason["support"] == 4 and reason["lift"] == 3.0 and reason["cosine"] is None
    assert reason["text"] == "often bought together with 'dry shampoo volume' (lift 3.0)"
    assert [d["source_topic"] for d in h.producer.values("dead-letter")] == ["related-items"]


def test_a_burst_of_related_lists_is_applied_a_bounded_share_per_poll(
    store: ClientVectorStore,
) -> None:
    # The association agent publishes every changed list at once; the updates waiting behind
    # such a burst are answered after RELATED_PER_POLL of them, the rest follow in later polls.
    h = Harness(store)
    burst = RELATED_PER_POLL * 2 + 3
    for n in range(burst):
        h.related.add_json(_related(f"item{n}", "nail"), key=f"item{n}")
    h.consumer.add_json(_update("u", "lip1"), key="u")
    h.recommender.poll_once()
    assert "u" in h.recs()
    assert len(h.recommender.related) == RELATED_PER_POLL
    h.recommender.poll_once()
    h.recommender.poll_once()
    assert len(h.recommender.related) == burst


def test_vector_strategy_ignores_behaviour_evidence(store: ClientVectorStore) -> None:
    h = Harness(store, strategy="vector")
    h.related.add_json(_related("sh1", "nail"), key="sh1")
    h.consumer.add_json(_update("v", "sh1"), key="v")
    h.recommender.poll_once()
    rec = h.recs()["v"]
    assert rec["strategy"] == "vector/pooled"
    assert all(r["kind"] == "similar" for i in rec["items"] for r in i["reasons"])


def test_text_user_vector_encodes_the_profile(store: ClientVectorStore) -> None:
    h = Harness(store, user_vector="text")
    h.consumer.add_json(_update("u", "lip1"), key="u")
    h.recommender.poll_once()
    assert h.encoder.calls == [["bought: red matte lipstick"]]
    items = [i["item_id"] for i in h.recs()["u"]["items"]]
    assert items[0].startswith("lip")
    assert h.recs()["u"]["strategy"] == "hybrid/text"


def test_micro_batch_coalesces_and_respects_max_batch(store: ClientVectorStore) -> None:
    h = Harness(store, max_batch=3)
    h.consumer.add_json(_update("u", "lip1", triggers=["e1"], ts=90), key="u")
    h.consumer.add_json(_update("u", "lip2", "lip1", triggers=["e2"], ts=60), key="u")
    h.consumer.add_json(_update("v", "sh1", triggers=["f1"]), key="v")
    h.consumer.add_json(_update("u", "lip3", "lip2", "lip1", triggers=["e3"], ts=5), key="u")
    first = h.recommender.poll_once()
    assert (first.records, first.users, first.coalesced) == (3, 2, 1)
    u_first = next(r for r in first.recommendations if r.user_id == "u")
    assert u_first.trigger_event_ids == ["e1", "e2"]
    assert u_first.latency_ms == pytest.approx(90.0)
    assert {i.item_id for i in u_first.items}.isdisjoint({"lip1", "lip2"})
    second = h.recommender.poll_once()
    assert (second.records, second.users) == (1, 1)
    assert second.recommendations[0].trigger_event_ids == ["e3"]
    assert h.consumer.commits == [3, 4]
    assert h.metrics.profile_updates_coalesced._value.get() == 1
    assert h.recommender.poll_once().records == 0


def test_commits_are_spaced_by_the_interval_and_made_when_stopping(
    store: ClientVectorStore,
) -> None:
    h = Harness(store, max_batch=1, commit_interval_ms=60_000)
    for user in ("u", "v", "w"):
        h.consumer.add_json(_update(user, "lip1"), key=user)
    h.recommender.poll_once()
    h.recommender.poll_once()
    # The first batch commits; the second is answered but not committed within the interval.
    assert h.consumer.commits == [1]
    stop = threading.Event()
    stop.set()
    h.recommender.run(stop)
    assert h.consumer.commits == [1, 2]
    assert len(h.recs()) == 2


def test_offsets_are_committed_only_once_the_answers_are_acknowledged(
    store: ClientVectorStore,
) -> None:
    h = Harness(store, max_batch=1)
    h.producer.hold = True  # the broker has not acknowledged anything yet
    for user in ("u", "v"):
        h.consumer.add_json(_update(user, "lip1"), key=user)
    assert h.recommender.poll_once().published == 1
    assert h.recommender.poll_once().published == 1
    # Both answered without waiting for the broker, neither committed.
    assert len(h.recs()) == 2
    assert h.consumer.commits == []
    assert h.metrics.event_to_recommendation_seconds._sum.get() == 0
    h.producer.deliver()
    assert h.recommender.poll_once().records == 0
    assert h.consumer.commits == [2]
    # The latency histogram counts acknowledged recommendations.
    assert h.metrics.recommendations_published._value.get() == 2
    assert h.metrics.event_to_recommendation_seconds._sum.get() > 0


def test_a_refused_answer_stops_the_loop_without_committing_it(store: ClientVectorStore) -> None:
    h = Harness(store)
    h.producer.refuse_topics = {"recommendations"}
    h.consumer.add_json(_update("u", "lip1"), key="u")
    with pytest.raises(DeliveryError, match="refused by the broker"):
        h.recommender.poll_once()
    assert h.consumer.commits == []


def test_bad_profile_updates_go_to_dead_letter_and_good_ones_flow(store: ClientVectorStore) -> None:
    h = Harness(store)
    h.consumer.add(b"not json", key=b"x")
    h.consumer.add_json({**_update("y", "lip1"), "trigger_event_ids": []}, key="y")
    h.consumer.add_json(_update("u", "lip1"), key="u")
    result = h.recommender.poll_once()
    assert result.dead_letters == 2
    assert list(h.recs()) == ["u"]
    letters = h.producer.values("dead-letter")
    assert [d["error_type"] for d in letters] == ["malformed_json", "invalid_fields"]
    assert {d["stage"] for d in letters} == {"recommender"}
    assert h.consumer.commits == [3]


def test_user_with_unknown_items_still_gets_a_record(store: ClientVectorStore) -> None:
    h = Harness(store)
    h.related.add_json(_related("lip1", "nail", count=9.0), key="lip1")
    h.consumer.add_json(_update("w", "not-in-catalog"), key="w")
    h.recommender.poll_once()
    rec = h.recs()["w"]
    # No vector and no evidence: the popularity fallback, explained by the user's own item.
    assert [i["item_id"] for i in rec["items"]] == ["lip1", "nail"][: len(rec["items"])]
    assert all(r["source_item_id"] == "not-in-catalog" for i in rec["items"] for r in i["reasons"])


def test_item_cache_asks_the_store_once_for_absent_items(store: ClientVectorStore) -> None:
    calls: list[list[str]] = []
    original = store.get_vectors

    def counting(ids: Any) -> Any:
        ids = list(ids)
        calls.append(ids)
        return original(ids)

    store.get_vectors = counting  # type: ignore[method-assign]
    cache = ItemCache(store, capacity=2)
    cache.fetch(["lip1", "ghost"])
    cache.fetch(["lip1", "ghost"])
    assert calls == [["lip1", "ghost"]]
    assert cache.get("lip1") is not None
    assert cache.get("ghost") is None
    cache.fetch(["lip2", "lip3"])  # capacity 2: lip1 is evicted
    assert cache.get("lip1") is None
    assert cache.get("lip3") is not None


def test_item_cache_rows_are_reused_after_eviction_and_growth_keeps_vectors(
    store: ClientVectorStore,
) -> None:
    cache = ItemCache(store, capacity=2)
    cache.fetch(["lip1", "lip2"])
    before = cache.vectors()["lip1"].copy()
    cache.fetch(["lip3"])  # evicts lip1 (least recently used), its row goes to lip3
    rows = cache.vectors()
    assert "lip1" not in rows and set(rows) == {"lip2", "lip3"}
    expected = store.get_vectors(["lip2", "lip3"])
    for item_id in ("lip2", "lip3"):
        np.testing.assert_allclose(rows[item_id], expected[item_id])
    ids, matrix = rows.gather(["lip3", "lip1", "lip2"])
    assert ids == ["lip3", "lip2"] and matrix.shape == (2, FakeEncoder.dim)
    cache.invalidate(["lip2"])
    assert cache.get("lip2") is None and cache.size() == 1
    cache.fetch(["lip1"])
    np.testing.assert_allclose(cache.vectors()["lip1"], before)

    big = ItemCache(store, capacity=10_000)
    vectors = {f"x{n}": np.full(FakeEncoder.dim, n, dtype=np.float32) for n in range(1500)}
    store.get_vectors = lambda ids: {i: vectors[i] for i in ids if i in vectors}  # type: ignore[method-assign]
    store.get_payloads = lambda ids: {i: {"title": i} for i in ids}  # type: ignore[method-assign]
    big.fetch(list(vectors)[:1000])
    big.fetch(list(vectors)[1000:])  # past the first 1,024 rows: the matrix grows
    rows = big.vectors()
    assert len(rows) == 1500
    assert rows["x0"][0] == 0.0 and rows["x1023"][0] == 1023.0 and rows["x1499"][0] == 1499.0


def test_popularity_is_rebuilt_at_most_once_per_refresh_interval() -> None:
    def lst(item: str, count: float) -> RelatedItems:
        return RelatedItems.model_validate(_related(item, "nail", count=count))

    index = RelatedIndex()
    index.apply("a", lst("a", 5.0))
    assert index.popularity() == [("a", 5.0)]
    index.apply("b", lst("b", 9.0))
    assert index.popularity() == [("a", 5.0)]  # within the interval: the prior may lag
    index._built_at -= RelatedIndex.POPULARITY_REFRESH_S
    assert index.popularity() == [("b", 9.0), ("a", 5.0)]
    weights = BlendWeights()
    ranked, prior = index.popularity_with_prior(weights)
    assert ranked == [("b", 9.0), ("a", 5.0)]
    assert prior == popularity_prior(ranked, weights)
    assert prior["b"] > prior["a"] > 0.0
    assert index.popularity_with_prior(weights)[1] is prior  # kept until the list is rebuilt
    index.apply("b", None)
    index._built_at -= RelatedIndex.POPULARITY_REFRESH_S
    assert index.popularity() == [("a", 5.0)] and len(index) == 1
    ranked, prior = index.popularity_with_prior(weights)  # the prior of the rebuilt list
    assert ranked == [("a", 5.0)] and prior.keys() == {"a"}


def test_a_profile_tombstone_removes_the_users_list_and_their_earlier_update(
    store: ClientVectorStore,
) -> None:
    # An erased user: the stream processor sends a profile-updates tombstone after any update
    # still in flight; the recommender answers with a recommendations tombstone instead.
    h = Harness(store)
    h.consumer.add_json(_update("gone", "lip1"), key="gone")
    h.consumer.add(None, key=b"gone")
    h.consumer.add_json(_update("kept", "lip1"), key="kept")
    h.consumer.add(None, key=b"back")
    h.consumer.add_json(_update("back", "lip1"), key="back")  # new events after the erasure
    result = h.recommender.poll_once()
    assert sorted(r.user_id for r in result.recommendations) == ["back", "kept"]
    assert next(
        (key, value) for topic, key, value in h.producer.records if topic == "recommendations"
    ) == (b"gone", None)
    assert (b"back", None) not in [(k, v) for t, k, v in h.producer.records]
    assert result.dead_letters == 0
    assert h.consumer.commits == [5]


def _versioned_store(model: ModelIdentity) -> ClientVectorStore:
    s = ClientVectorStore(collection="items", path=":memory:", model=model)
    s.ensure_collection(FakeEncoder.dim)
    ids = list(CATALOG)
    s.upsert(
        ids, FakeEncoder().encode([CATALOG[i] for i in ids]), [{"title": CATALOG[i]} for i in ids]
    )
    return s


def test_recommendations_name_the_vectors_version_they_searched(store: ClientVectorStore) -> None:
    versioned = _versioned_store(ModelIdentity.of(FakeEncoder()))
    h = Harness(versioned)
    h.consumer.add_json(_update("u", "lip1"), key="u")
    h.recommender.poll_once()
    rec = h.recs()["u"]
    assert rec["items"]
    assert (rec["model_version"], rec["vectors_version"]) == ("v1", "v1")
    versioned.close()
    # An unversioned store (before versioned stores) names none: the field stays optional.
    plain = Harness(store)
    plain.consumer.add_json(_update("u", "lip1"), key="u")
    plain.recommender.poll_once()
    assert plain.recs()["u"]["vectors_version"] is None


def test_recommender_refuses_a_store_of_another_model() -> None:
    other = _versioned_store(ModelIdentity("fake+adapter", "v2"))
    with pytest.raises(ModelMismatchError) as refused:
        Harness(other)
    assert "fake+adapter version v2" in str(refused.value)
    assert "fake version v1" in str(refused.value)
    other.close()


def test_a_user_without_history_gets_available_trending_items(store: ClientVectorStore) -> None:
    store.set_available(["sh2"], False)
    h = Harness(store)
    h.related.add_json(_related("lip1", "nail", count=50.0), key="lip1")
    h.related.add_json(_related("sh2", "nail", count=30.0), key="sh2")  # retired since
    h.related.add_json(_related("nail", "lip1", count=10.0), key="nail")
    update = {**_update("new", "x"), "history": [], "last_item_id": "x"}
    h.consumer.add_json(update, key="new")
    h.recommender.poll_once()
    rec = h.recs()["new"]
    assert [i["item_id"] for i in rec["items"]] == ["lip1", "nail"]
    for item in rec["items"]:
        (reason,) = item["reasons"]
        assert reason["kind"] == "trending" and reason["source_item_id"] is None
    assert rec["items"][0]["reasons"][0]["item_count"] == 50.0


def test_the_mmr_setting_diversifies_the_published_list(store: ClientVectorStore) -> None:
    lists = {}
    for lam in (1.0, 0.0):
        h = Harness(store, k=3, mmr_lambda=lam)
        h.consumer.add_json(_update("u", "lip1"), key="u")
        h.recommender.poll_once()
        lists[lam] = [i["item_id"] for i in h.recs()["u"]["items"]]
    # Score order: the three other lipsticks; lambda 0: only the best of them, then others.
    assert set(lists[1.0]) == {"lip2", "lip3", "lip4"}
    assert lists[0.0][0] == lists[1.0][0]
    assert len({i for i in lists[0.0] if i.startswith("lip")}) < 3
