"""The recommender publishes each list with its candidate pool (the next candidates, their
catalog attributes, the pairwise similarities) and says when the business rules fell back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.messages import Recommendation
from schemas.reranking import decode_similarities, rerank
from schemas.rules import ItemMatch
from tests.unit.test_recommender import CATALOG, Harness, _related, _update
from tests.unit.worker_fakes import FakeEncoder
from workers.client_store import ClientVectorStore
from workers.ranking.diversity import similarity_matrix

BRANDS = {"lip": "Rosa", "sh": "Nova", "nail": "Nova"}


def _payload(item_id: str) -> dict[str, Any]:
    family = item_id.rstrip("0123456789")
    return {
        "title": CATALOG[item_id],
        "categories": [{"lip": "Lips", "sh": "Hair", "nail": "Nails"}[family]],
        "brand": BRANDS[family],
        "price": 5.0 + len(item_id),
        "available": True,
    }


@pytest.fixture
def store() -> Iterator[ClientVectorStore]:
    s = ClientVectorStore(collection="items", path=":memory:")
    s.ensure_collection(FakeEncoder.dim)
    ids = list(CATALOG)
    s.upsert(ids, FakeEncoder().encode([CATALOG[i] for i in ids]), [_payload(i) for i in ids])
    yield s
    s.close()


def _published(store: ClientVectorStore, **settings: Any) -> tuple[Harness, Recommendation]:
    h = Harness(store, **settings)
    h.related.add_json(_related("lip1", "nail", "sh2"), key="lip1")
    h.consumer.add_json(_update("u", "lip1"), key="u")
    h.recommender.poll_once()
    (raw,) = h.producer.values("recommendations")
    return h, Recommendation.model_validate(raw)


@pytest.mark.parametrize("mmr_lambda", [1.0, 0.5])
def test_the_published_items_are_the_same_with_or_without_a_pool(
    store: ClientVectorStore, mmr_lambda: float
) -> None:
    _, without = _published(store, pool_size=0, mmr_lambda=mmr_lambda)
    _, with_pool = _published(store, pool_size=20, mmr_lambda=mmr_lambda)
    assert without.pool is None and with_pool.pool is not None
    assert with_pool.items == without.items  # ids, order, scores and reasons


def test_the_pool_holds_the_next_candidates_their_attributes_and_similarities(
    store: ClientVectorStore,
) -> None:
    _, rec = _published(store, k=3, pool_size=2, mmr_lambda=0.9)
    pool = rec.pool
    assert pool is not None and pool.mmr_lambda == 0.9
    listed = [i.item_id for i in rec.items]
    following = [i.item_id for i in pool.items]
    assert len(following) == 2 and not set(following) & {*listed, "lip1"}
    # Best first, each with its strongest reason only.
    assert [i.score for i in pool.items] == sorted((i.score for i in pool.items), reverse=True)
    assert all(len(i.reasons) == 1 for i in pool.items)
    every = listed + following
    assert [a.brand for a in pool.attributes] == [_payload(i)["brand"] for i in every]
    assert [a.categories for a in pool.attributes] == [_payload(i)["categories"] for i in every]
    vectors = store.get_vectors(every)
    sims = decode_similarities(pool.similarities, len(every))
    assert abs(sims - similarity_matrix(every, vectors)).max() <= 0.5 / 127 + 1e-6
    # Re-ranked at the list's own lambda, with no filter, the list comes back.
    assert [i.item_id for i in rerank(rec, lam=pool.mmr_lambda).items] == listed
    # A filter draws on the pool: only the hair items, from the list or after it.
    hair = rerank(rec, match=ItemMatch(categories=["Hair"]))
    assert hair.items and {i.item_id for i in hair.items} <= {"sh1", "sh2", "sh3"}


def test_a_trending_list_has_a_pool_scored_like_it(store: ClientVectorStore) -> None:
    h = Harness(store, k=1, pool_size=2)
    for item, count in (("lip1", 50.0), ("nail", 30.0), ("sh1", 10.0)):
        h.related.add_json(_related(item, "lip2", count=count), key=item)
    h.consumer.add_json({**_update("new", "x"), "history": [], "last_item_id": "x"}, key="new")
    h.recommender.poll_once()
    rec = Recommendation.model_validate(h.recs()["new"])
    assert [i.item_id for i in rec.items] == ["lip1"] and rec.items[0].score == 1.0
    assert rec.pool is not None and rec.pool.mmr_lambda == 1.0
    assert [(i.item_id, i.score) for i in rec.pool.items] == [("nail", 0.6), ("sh1", 0.2)]
    assert all(i.reasons[0].kind == "trending" for i in rec.pool.items)


def test_a_rules_fallback_is_published_and_counted(
    store: ClientVectorStore, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"only": {"brands": ["Nobody"]}}))
    h, rec = _published(store, rules_path=rules)
    assert rec.items and rec.fallbacks == ["business_rules_removed_every_candidate"]
    registry = h.metrics.rule_fallbacks
    assert registry.labels("business_rules")._value.get() == 1
    # Rules that leave candidates: nothing to report.
    rules.write_text(json.dumps({"only": {"brands": ["Nova"]}}))
    h, rec = _published(store, rules_path=rules)
    assert rec.fallbacks == [] and {i.item_id for i in rec.items} <= {"sh1", "sh2", "sh3", "nail"}
    assert h.metrics.rule_fallbacks.labels("business_rules")._value.get() == 0
