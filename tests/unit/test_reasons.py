"""Structured reasons: evidence as fields, one short text naming its source once."""

from __future__ import annotations

import numpy as np

from schemas.messages import Evidence, Recommendation
from workers.ranking import BlendWeights, recommend

from .ranking_fakes import entry, lookups, related_list

V = {
    "heart": np.array([1.0, 0.0, 0.0], dtype=np.float32),
    "heart2": np.array([0.9, np.sqrt(1 - 0.81), 0.0], dtype=np.float32),  # unit length
    "candle": np.array([0.0, 1.0, 0.0], dtype=np.float32),
    "bag": np.array([0.0, 0.0, 1.0], dtype=np.float32),
}
TITLES = {"heart": "WHITE HEART", "heart2": "RED HEART", "candle": "CANDLE", "bag": "BAG"}
EVIDENCE = Evidence(
    support=37, confidence=0.25, lift=4.2, pmi=2.07, text="bought together in 37 baskets, lift 4.2"
)


def _answer() -> dict[str, list]:  # type: ignore[type-arg]
    look = lookups(
        vectors=V,
        related={"heart": related_list("heart", ("candle", "bought_together", 0.9, EVIDENCE))},
        popularity=[("bag", 50.0), ("candle", 20.0)],
        titles=TITLES,
    )
    (items,) = recommend([[entry("heart")]], lookups=look, weights=BlendWeights(), k=3)
    return {i.item_id: i.reasons for i in items}


def test_association_reason_carries_its_evidence_as_fields() -> None:
    reasons = _answer()["candle"]
    assoc = next(r for r in reasons if r.kind == "bought_together")
    assert assoc.source_item_id == "heart"
    assert (assoc.support, assoc.confidence, assoc.lift, assoc.pmi) == (37, 0.25, 4.2, 2.07)
    assert assoc.cosine is None
    # The source is named once, by title, with one number; no evidence text pasted after it.
    assert assoc.text == "often bought together with 'WHITE HEART' (lift 4.2)"
    assert assoc.text.count("bought together") == 1


def test_similarity_and_popularity_reasons_carry_cosine_and_count() -> None:
    answer = _answer()
    similar = next(r for r in answer["heart2"] if r.kind == "similar")
    assert similar.source_item_id == "heart"
    assert similar.cosine is not None and abs(similar.cosine - 0.9) < 1e-6
    assert similar.text == "similar to 'WHITE HEART' (cosine 0.90)"
    assert similar.support is None and similar.lift is None
    popular = next(r for i in answer.values() for r in i if r.kind == "popular")
    assert popular.item_count in (50.0, 20.0)
    # No "(after ...)": the popularity prior has nothing to do with the history item.
    assert popular.text == "popular with shoppers"


def test_no_reason_text_names_its_source_twice() -> None:
    for reasons in _answer().values():
        for reason in reasons:
            for title in TITLES.values():
                assert reason.text.count(f"'{title}'") <= 1


def test_the_json_schema_documents_the_evidence_fields() -> None:
    schema = Recommendation.model_json_schema()
    props = schema["$defs"]["Reason"]["properties"]
    for name in ("kind", "source_item_id", "support", "confidence", "lift", "cosine", "text"):
        assert name in props and props[name].get("description")
    assert "trending" in props["kind"]["enum"]
    # Old subscribers keep their fields: only the new ones are optional.
    assert set(schema["$defs"]["Reason"]["required"]) == {
        "source_item_id",
        "kind",
        "strength",
        "text",
    }
