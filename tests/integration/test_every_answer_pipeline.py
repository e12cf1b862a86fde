"""Every user answered and `similar` served with the embedded store, against the real broker,
the real MiniLM and the embedded qdrant-edge store (owned by the workers' loops): a user never
seen gets the trending list over HTTP, labelled as trending; an indexed item's nearest
neighbours, published by the item indexer to `similar-items`, are served by
`GET /items/{id}/related?kind=similar`, and a retired item leaves them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from relata.cli.run_streams import start_streams_in_thread
from relata.cli.run_workers import build_workers
from relata.runtime.kafka_broker import free_port
from relata.runtime.topics import ensure_topics
from schemas.settings import (
    EncoderSettings,
    IndexerSettings,
    KafkaSettings,
    RecommenderSettings,
    StoreSettings,
    StreamsSettings,
)
from schemas.topics import ALL_TOPICS
from tests.integration.test_poison_pipeline import event, publish
from workers.edge_store import EdgeVectorStore
from workers.encoder import TransformerEncoder

pytestmark = pytest.mark.integration

WAIT_S = 120.0
CATALOG = {
    "lip-red": "red matte lipstick",
    "lip-pink": "pink matte lipstick",
    "lip-coral": "coral matte lipstick",
    "shampoo-dry": "dry shampoo for volume",
    "shampoo-clear": "clarifying shampoo for oily hair",
    "nail-remover": "nail polish remover",
}
# Baskets: every user buys a lipstick and a shampoo, so lists and popularity exist.
BASKETS = {
    "u1": ["lip-red", "shampoo-dry"],
    "u2": ["lip-red", "shampoo-clear"],
    "u3": ["lip-pink", "shampoo-dry"],
}


def _wait(what: str, condition: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.3)


@pytest.fixture
def workers(kafka_settings: KafkaSettings, tmp_path: Path) -> Iterator[None]:
    """Indexer and recommender in one process around one embedded store, as with
    `relata workers --role all`; the trending list ranked every half second. The topics first:
    the recommender assigns itself every partition of related-items when it is built."""
    ensure_topics(kafka_settings, ALL_TOPICS)
    encoder = TransformerEncoder.from_settings(EncoderSettings(device="cpu"))
    store = EdgeVectorStore(tmp_path / "edge")
    store.ensure_collection(encoder.dim)
    built = build_workers(
        "all",
        kafka=kafka_settings,
        encoder_settings=EncoderSettings(),
        store_settings=StoreSettings(kind="edge", path=tmp_path),
        indexer_settings=IndexerSettings(
            group_id=f"{kafka_settings.topic_prefix}indexer", similar_k=3
        ),
        recommender_settings=RecommenderSettings(
            group_id=f"{kafka_settings.topic_prefix}recommender",
            k=3,
            candidates=10,
            trending_interval_s=0.5,
        ),
        registry=CollectorRegistry(),
        encoder=encoder,
        store=store,
    )
    stop = threading.Event()
    thread = threading.Thread(target=built.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
        built.close()


def test_a_never_seen_user_gets_trending_and_similar_is_served_with_the_embedded_store(
    kafka_settings: KafkaSettings,
    unique_id: str,
    tmp_path: Path,
    workers: None,
) -> None:
    kafka = kafka_settings
    publish(
        kafka,
        "item-catalog",
        [
            (item_id.encode(), json.dumps({"item_id": item_id, "title": title}).encode())
            for item_id, title in CATALOG.items()
        ],
    )
    settings = StreamsSettings(
        app_id=f"streams-{unique_id}",
        data_dir=tmp_path / "faust",
        web_port=free_port(),
        session_timeout_s=3.0,
        heartbeat_interval_s=0.5,
        assoc_batch_window_s=0.5,
    )
    # No vector store given to the stream processor: `similar` comes from the topic.
    with start_streams_in_thread(kafka=kafka, settings=settings, ready_timeout_s=120) as running:
        base = running.url
        assert base is not None
        publish(
            kafka,
            "behavior-events",
            [
                (user.encode(), event(n, user, item))
                for user, items in BASKETS.items()
                for n, item in enumerate(items)
            ],
        )
        with httpx.Client(base_url=base, timeout=5) as http:

            def answer(path: str) -> Any:
                response = http.get(path)
                return response.json() if response.status_code == 200 else None

            # A user who never produced an event: the trending list, labelled as such.
            body = _wait(
                "a never-seen user answered", lambda: answer("/users/never-seen/recommendations")
            )
            assert body["trending"] is True and body["user_id"] == "never-seen"
            assert body["generated_at"] and body["placement"] == "home"
            ids = [item["item_id"] for item in body["items"]]
            assert ids and set(ids) <= set(CATALOG)
            assert "lip-red" in ids or "shampoo-dry" in ids  # bought twice each
            for item in body["items"]:
                assert [r["kind"] for r in item["reasons"]] == ["trending"]
                assert item["reasons"][0]["source_item_id"] is None
            # A user with events gets their own list, not the trending one.
            own = _wait("u1 answered", lambda: answer("/users/u1/recommendations"))
            assert "trending" not in own and own["trigger_event_ids"]

            # An indexed item's nearest neighbours, from the real model's vectors.
            def similar_of(item_id: str) -> list[str] | None:
                body = answer(f"/items/{item_id}/related?kind=similar&k=3")
                if body is None or not body["related"]:
                    return None
                assert body["similar_available"] is True
                assert {r["kind"] for r in body["related"]} == {"similar"}
                assert all(r["evidence"]["cosine"] is not None for r in body["related"])
                return [r["item_id"] for r in body["related"]]

            neighbours = _wait("similar items of lip-red", lambda: similar_of("lip-red"))
            assert neighbours[0] in {"lip-pink", "lip-coral"} and "lip-red" not in neighbours
            assert len(neighbours) == 3

            # A retired item leaves the `similar` lists it was in.
            publish(kafka, "item-catalog", [(b"lip-pink", None)])
            _wait(
                "lip-pink gone from lip-red's similar items",
                lambda: (found := similar_of("lip-red")) is not None and "lip-pink" not in found,
            )
            assert http.get("/items/lip-pink/related?kind=similar").status_code == 404
