"""Re-ranking a published list from its candidate pool (`schemas.reranking`): filters, MMR on
the published similarities, pins, k, and the fallback when a filter matches nothing."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.decoding import Rejection, decode
from schemas.messages import CandidatePool, ItemAttributes, Recommendation, RecommendedItem
from schemas.reranking import (
    decode_similarities,
    encode_similarities,
    mmr_order,
    rerank,
)
from schemas.rules import ItemMatch
from tests.unit.test_schemas import pooled_recommendations
from workers.ranking import mmr
from workers.ranking.diversity import similarity_matrix
from workers.ranking.pool import candidate_pool, item_attributes


def _unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


# Three near-duplicate lipsticks, a shampoo and a nail polish; one brand per family.
VECTORS = {
    "lip1": _unit(1.0, 0.05, 0.0),
    "lip2": _unit(1.0, 0.0, 0.05),
    "lip3": _unit(1.0, 0.04, 0.04),
    "sh1": _unit(0.2, 1.0, 0.0),
    "nail": _unit(0.2, 0.0, 1.0),
}
ATTRIBUTES = {
    "lip1": {"categories": ["Lips"], "brand": "Rosa", "price": 12.0},
    "lip2": {"categories": ["Lips"], "brand": "Rosa", "price": 30.0},
    "lip3": {"categories": ["Lips", "Gifts"], "brand": "Nova", "price": 8.0},
    "sh1": {"categories": ["Hair"], "brand": "Nova", "price": 9.0},
    "nail": {"categories": ["Nails"], "brand": None, "price": None},
}
SCORES = {"lip1": 1.0, "lip2": 0.98, "lip3": 0.97, "sh1": 0.7, "nail": 0.6}


def item(item_id: str, *, kind: str = "similar") -> RecommendedItem:
    reason = {"source_item_id": None if kind == "pinned" else "seen", "kind": kind}
    return RecommendedItem.model_validate(
        {
            "item_id": item_id,
            "score": 0.0 if kind == "pinned" else SCORES[item_id],
            "reasons": [{**reason, "strength": 0.5, "text": "t"}],
        }
    )


def recommendation(
    shown: list[RecommendedItem], following: list[str], *, lam: float = 1.0, **extra: Any
) -> Recommendation:
    """A published list with its pool, as the recommender builds it."""
    pool = candidate_pool(
        shown,
        [item(i) for i in following],
        attributes={i: item_attributes(a) for i, a in ATTRIBUTES.items()},
        vectors=VECTORS,
        mmr_lambda=lam,
    )
    return Recommendation(
        user_id="u",
        items=shown,
        generated_at=datetime(2024, 1, 1, tzinfo=UTC),
        model_name="m",
        model_version="1",
        strategy="hybrid/pooled",
        trigger_event_ids=["e1"],
        latency_ms=1.0,
        pool=pool,
        **extra,
    )


def ids(rec: Recommendation) -> list[str]:
    return [i.item_id for i in rec.items]


PUBLISHED = recommendation([item("lip1"), item("lip2"), item("lip3")], ["sh1", "nail"])


def test_the_recommender_mmr_is_the_shared_one() -> None:
    ranked = sorted(SCORES.items(), key=lambda p: -p[1])
    names = [i for i, _ in ranked]
    sims = similarity_matrix(names, VECTORS)
    for lam in (1.0, 0.7, 0.5, 0.3, 0.0):
        shared = mmr_order([s for _, s in ranked], lambda: sims, k=3, lam=lam)
        assert mmr(ranked, VECTORS, k=3, lam=lam) == [names[j] for j in shared]
    # Score order needs no similarities at all.
    assert mmr_order([1.0, 0.5], lambda: pytest.fail("asked for similarities"), k=2, lam=1.0)


@given(st.lists(st.floats(-1, 1), min_size=0, max_size=40))
def test_similarities_travel_in_one_byte_each(values: list[float]) -> None:
    n = 1
    while n * (n - 1) // 2 < len(values):
        n += 1
    sims = np.eye(n)
    upper = np.triu_indices(n, k=1)
    cut = np.zeros(len(upper[0]))
    cut[: len(values)] = values
    sims[upper] = cut
    sims[upper[1], upper[0]] = cut
    text = encode_similarities(sims)
    assert len(base64.b64decode(text)) == n * (n - 1) // 2
    back = decode_similarities(text, n)
    assert np.abs(back - sims).max() <= 0.5 / 127 + 1e-12
    assert np.array_equal(back, back.T) and (np.diag(back) == 1).all()
    # No vector, no similarity: 0 is exact.
    assert back[sims == 0.0].max(initial=0.0) == 0.0


def test_a_pool_that_does_not_match_its_list_is_rejected_as_invalid_fields() -> None:
    def decoded(**pool: Any) -> Recommendation | Rejection:
        data = PUBLISHED.model_dump(mode="json")
        data["pool"].update(pool)
        return decode(json.dumps(data).encode(), Recommendation)

    assert decoded() == PUBLISHED
    short = decoded(attributes=[{}] * 4)
    assert isinstance(short, Rejection) and short.error_type == "invalid_fields"
    assert "pool.attributes holds 4 entries for 5 items" in short.reason
    wrong = decoded(similarities="AAAA")
    assert isinstance(wrong, Rejection) and "holds 3 bytes for 5 items" in wrong.reason
    assert isinstance(decoded(similarities="not base64!"), Rejection)
    twice = decoded(items=[item("lip1").model_dump(mode="json")] * 2)
    assert isinstance(twice, Rejection) and "listed twice" in twice.reason


def test_filters_by_category_brand_and_price_draw_on_the_pool() -> None:
    assert ids(rerank(PUBLISHED, match=ItemMatch(categories=["Hair", "Nails"]))) == ["sh1", "nail"]
    assert ids(rerank(PUBLISHED, match=ItemMatch(brands=["Nova"]))) == ["lip3", "sh1"]
    # An unpriced item never matches a price condition.
    assert ids(rerank(PUBLISHED, match=ItemMatch(max_price=10))) == ["lip3", "sh1"]
    assert ids(rerank(PUBLISHED, match=ItemMatch(min_price=10, max_price=20))) == ["lip1"]
    both = rerank(PUBLISHED, match=ItemMatch(categories=["Lips"], brands=["Rosa"]))
    assert ids(both) == ["lip1", "lip2"] and both.fallbacks == [] and both.pool is None


def test_diversity_and_k_re_rank_over_the_published_similarities() -> None:
    # Score order over the list and its pool; the pool's items fill a longer list.
    assert ids(rerank(PUBLISHED, lam=1.0, k=5)) == ["lip1", "lip2", "lip3", "sh1", "nail"]
    assert ids(rerank(PUBLISHED, k=2)) == ["lip1", "lip2"]
    # Lower lambda swaps near-duplicates for different items, as the recommender's MMR does.
    ranked = sorted(SCORES.items(), key=lambda p: -p[1])
    for lam in (0.5, 0.3):
        assert ids(rerank(PUBLISHED, lam=lam)) == mmr(ranked, VECTORS, k=3, lam=lam)
    assert ids(rerank(PUBLISHED, lam=0.3)) == ["lip1", "sh1", "nail"]


def test_a_filter_keeps_the_published_lambda_and_pins_keep_their_place() -> None:
    shown = [item("nail", kind="pinned"), item("lip1"), item("sh1")]
    published = recommendation(shown, ["lip2", "lip3"], lam=0.3)
    # Lipsticks only, re-ranked at the list's own lambda; the pin matches no filter: gone.
    lips = rerank(published, match=ItemMatch(categories=["Lips"]))
    ranked = [(i, SCORES[i]) for i in ("lip1", "lip2", "lip3")]
    assert ids(lips) == mmr(ranked, VECTORS, k=3, lam=0.3) == ["lip1", "lip2", "lip3"]
    # Without filters the pin stays first; score order behind it.
    assert ids(rerank(published, lam=1.0, k=3)) == ["nail", "lip1", "lip2"]
    assert rerank(published, lam=1.0).items[0].reasons[0].kind == "pinned"


def test_filters_that_match_nothing_are_not_applied_and_the_answer_says_why() -> None:
    answer = rerank(PUBLISHED, match=ItemMatch(brands=["Nobody"]))
    assert ids(answer) == ids(PUBLISHED)
    assert answer.fallbacks == ["request_filters_removed_every_candidate"]
    # A list the business rules already fell back on keeps saying so.
    ruled = recommendation(
        [item("lip1")], ["sh1"], fallbacks=["business_rules_removed_every_candidate"]
    )
    assert rerank(ruled, match=ItemMatch(brands=["Nobody"])).fallbacks == [
        "business_rules_removed_every_candidate",
        "request_filters_removed_every_candidate",
    ]
    assert rerank(ruled, k=1).fallbacks == ["business_rules_removed_every_candidate"]


def test_a_list_without_a_pool_re_ranks_its_own_items() -> None:
    old = PUBLISHED.model_copy(update={"pool": None})
    assert ids(rerank(old, lam=0.0, k=2)) == ["lip1", "lip2"]  # no similarities: score order
    # No attributes: a category filter matches nothing, so it is not applied, and said so.
    answer = rerank(old, match=ItemMatch(categories=["Lips"]))
    assert ids(answer) == ids(old)
    assert answer.fallbacks == ["request_filters_removed_every_candidate"]
    # An item-id condition needs no attributes.
    assert ids(rerank(old, match=ItemMatch(item_ids=["lip2"]))) == ["lip2"]


def test_item_attributes_from_a_store_payload_leave_odd_values_out() -> None:
    assert item_attributes(None) == ItemAttributes()
    got = item_attributes({"categories": ["A", 3], "brand": 7, "price": float("nan")})
    assert got == ItemAttributes(categories=["A", "3"])
    assert item_attributes({"price": True}).price is None
    assert item_attributes({"price": 4}).price == 4.0


def test_a_pool_round_trips_and_stays_small() -> None:
    back = Recommendation.model_validate_json(PUBLISHED.model_dump_json())
    assert back == PUBLISHED
    assert isinstance(back.pool, CandidatePool) and len(back.pool.similarities) == 16  # 10 bytes


matches = st.builds(
    ItemMatch,
    categories=st.lists(st.sampled_from(["", "a", "b"]), max_size=2),
    brands=st.lists(st.sampled_from(["", "a"]), max_size=1),
    min_price=st.none() | st.floats(0, 10),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pooled_recommendations(),
    st.none() | matches,
    st.none() | st.floats(0, 1),
    st.none() | st.integers(1, 100),
)
def test_any_published_list_re_ranks_to_at_most_k_of_its_candidates(
    rec: Recommendation, match: ItemMatch | None, lam: float | None, k: int | None
) -> None:
    answer = rerank(rec, match=match, lam=lam, k=k)
    assert rec.pool is not None and answer.pool is None
    candidates = [*rec.items, *rec.pool.items]
    assert len(answer.items) == min(len(rec.items) if k is None else k, len(candidates)) or match
    assert all(item in candidates for item in answer.items)
    assert answer.fallbacks[: len(rec.fallbacks)] == rec.fallbacks
