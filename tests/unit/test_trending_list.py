"""Every user answered: the recommender publishes the trending list to `trending-items`, and
the stream processor answers a user with no list of their own (never seen, or erased) with
it over HTTP, labelled as trending, never with an erased user's old list."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from openapi_spec_validator import validate
from prometheus_client import CollectorRegistry

from schemas.messages import Recommendation, RecommendedItem, TrendingList
from schemas.settings import KafkaSettings, StreamsSettings
from streams.app import build_streams
from streams.trending import TrendingView
from streams.web import TrendingRecommendation, no_list_answer, openapi_document
from tests.unit.test_recommender import CATALOG, TOPICS, Harness, _related, store
from tests.unit.test_streams_app import RecordingSender
from workers.client_store import ClientVectorStore

_ = store  # the fixture, used by name
TRENDING_TOPICS = replace(TOPICS, trending="trending-items")
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _harness(store: ClientVectorStore, **settings: Any) -> Harness:
    h = Harness(store, **{"trending_interval_s": 60.0, **settings})
    h.recommender.topics = TRENDING_TOPICS
    h.recommender.trending_publisher.topic = TRENDING_TOPICS.trending
    h.related.add_json(_related("lip1", "nail", count=50.0), key="lip1")
    h.related.add_json(_related("sh2", "nail", count=30.0), key="sh2")
    h.related.add_json(_related("nail", "lip1", count=10.0), key="nail")
    return h


def _published(h: Harness) -> list[tuple[bytes | None, TrendingList]]:
    return [
        (key, TrendingList.model_validate_json(value))
        for topic, key, value in h.producer.records
        if topic == "trending-items" and value is not None
    ]


# -- the recommender -----------------------------------------------------------------------------


def test_the_recommender_publishes_the_trending_list_of_its_placement(
    store: ClientVectorStore,
) -> None:
    store.set_available(["sh2"], False)
    h = _harness(store, placement="home")
    h.recommender.drain_related()
    h.recommender.poll_once()
    ((key, trending),) = _published(h)
    assert key == b"home" and trending.placement == "home"
    assert [i.item_id for i in trending.items] == ["lip1", "nail"]  # never the retired sh2
    for item in trending.items:
        (reason,) = item.reasons
        assert reason.kind == "trending" and reason.source_item_id is None
    assert (trending.model_name, trending.model_version) == ("fake", "v1")
    assert trending.strategy == h.recommender.strategy


def test_the_trending_list_is_published_again_only_when_its_items_change(
    store: ClientVectorStore,
) -> None:
    h = _harness(store)
    h.recommender.drain_related()
    for _ in range(3):
        h.recommender.trending_publisher.next_due = 0.0
        h.recommender.poll_once()
    assert len(_published(h)) == 1
    h.related.add_json(_related("sh1", "nail", count=90.0), key="sh1")
    h.recommender.drain_related()
    h.recommender.related._built_at = 0.0  # past the popularity refresh interval
    h.recommender.trending_publisher.next_due = 0.0
    h.recommender.poll_once()
    assert _published(h)[-1][1].items[0].item_id == "sh1"
    assert len(_published(h)) == 2


def test_only_the_leading_instance_publishes_and_never_when_switched_off(
    store: ClientVectorStore,
) -> None:
    follower = _harness(store)
    follower.recommender.trending_publisher.leads = lambda: False
    off = _harness(store, trending_interval_s=0.0)
    for h in (follower, off):
        h.recommender.drain_related()
        h.recommender.trending_publisher.next_due = 0.0
        h.recommender.poll_once()
        assert _published(h) == []
    # A follower that becomes the leader (partition 0 moved to it) publishes.
    follower.recommender.trending_publisher.leads = lambda: True
    follower.recommender.trending_publisher.next_due = 0.0
    follower.recommender.poll_once()
    assert len(_published(follower)) == 1
    assert set(CATALOG) >= {i.item_id for i in _published(follower)[0][1].items}


# -- the stream processor ------------------------------------------------------------------------


def _trending(placement: str, *items: str) -> bytes:
    return (
        TrendingList(
            placement=placement,
            items=[
                RecommendedItem.model_validate(
                    {
                        "item_id": item,
                        "score": 1.0,
                        "reasons": [
                            {
                                "source_item_id": None,
                                "kind": "trending",
                                "strength": 1.0,
                                "text": "trending: popular with shoppers lately",
                                "item_count": 5.0,
                            }
                        ],
                    }
                )
                for item in items
            ],
            generated_at=T0,
            model_name="m",
            model_version="v1",
            strategy="hybrid/pooled",
        )
        .model_dump_json()
        .encode()
    )


class FakeView:
    """What `no_list_answer` needs of a Faust view: its JSON and error responses."""

    def json(self, body: Any, status: int = 200) -> tuple[int, Any]:
        return status, body

    def error(self, status: int, message: str, **detail: Any) -> tuple[int, Any]:
        return status, {"error": message, **detail}


def test_the_view_keeps_the_latest_list_of_the_served_placement() -> None:
    view = TrendingView("home")
    assert view.current() is None
    view.apply(b"home", _trending("home", "a", "b"))
    view.apply(b"checkout", _trending("checkout", "z"))
    view.apply(b"home", _trending("home", "c"))
    view.apply(b"home", b"{broken")  # skipped: the last valid list stays
    current = view.current()
    assert current is not None and [i.item_id for i in current.items] == ["c"]
    view.apply(b"home", None)
    assert view.current() is None


def test_a_user_with_no_list_gets_the_trending_list_labelled_as_such() -> None:
    view = TrendingView("home")
    status, body = no_list_answer(FakeView(), view, "never-seen")  # type: ignore[arg-type]
    assert status == 404 and "no trending list yet" in body["error"]
    view.apply(b"home", _trending("home", "a", "b"))
    status, body = no_list_answer(FakeView(), view, "never-seen")  # type: ignore[arg-type]
    assert status == 200
    answer = TrendingRecommendation.model_validate(body)
    assert answer.user_id == "never-seen" and answer.trending is True
    assert answer.generated_at == T0 and answer.placement == "home"
    assert [i.item_id for i in answer.items] == ["a", "b"]
    assert {r.kind for i in answer.items for r in i.reasons} == {"trending"}


def test_an_erased_user_gets_the_trending_list_never_their_old_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        app = build_streams(
            kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
            settings=StreamsSettings(web_port=0, data_dir=tmp_path, trending_placement="home"),
            registry=CollectorRegistry(),
            sender=RecordingSender(),
            follow_topics=False,
        )
        assert app.trending is not None and app.trending.placement == "home"
        app.trending.apply(b"home", _trending("home", "t1"))
        own = TrendingList.model_validate_json(_trending("home", "mine")).items
        mine = Recommendation(
            user_id="u1",
            items=own,
            generated_at=T0,
            model_name="m",
            model_version="v1",
            strategy="hybrid/pooled",
            trigger_event_ids=["e1"],
            latency_ms=1.0,
        )
        async with app.process_recommendations.test_context() as agent:
            await agent.put(mine.model_dump_json().encode(), key=b"u1", partition=0)
        assert app.recommendations.get("u1") is not None
        async with app.process_recommendations.test_context() as agent:
            # The tombstone the recommender publishes when u1 is erased.
            await agent.put(None, key=b"u1", partition=0)
        assert app.recommendations.get("u1") is None
        status, body = no_list_answer(FakeView(), app.trending, "u1")  # type: ignore[arg-type]
        assert status == 200 and body["trending"] is True
        assert [i["item_id"] for i in body["items"]] == ["t1"]

    asyncio.run(scenario())


def test_openapi_names_both_answers_of_the_recommendations_path() -> None:
    document = openapi_document()
    validate(document)
    response = document["paths"]["/users/{user_id}/recommendations"]["get"]["responses"]["200"]
    refs = [s["$ref"] for s in response["content"]["application/json"]["schema"]["oneOf"]]
    assert refs == [
        "#/components/schemas/Recommendation",
        "#/components/schemas/TrendingRecommendation",
    ]
    assert "TrendingRecommendation" in document["components"]["schemas"]
