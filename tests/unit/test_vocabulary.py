"""A term declared once in `schemas.vocabulary` is accepted everywhere that names terms."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from schemas import vocabulary
from schemas.decoding import Rejection, decode
from schemas.messages import BehaviorEvent, HistoryEntry, RelatedItems
from schemas.settings import StreamsSettings
from schemas.vocabulary import EventTypeSpec, RelationKindSpec
from streams.profile import FoldConfig, fold_event
from streams.web import BadRequest, openapi_document, parse_related_query
from workers.ranking import BlendWeights, RelatedTable, profile_text, rank, strategy_weights

TS = datetime(2024, 5, 1, tzinfo=UTC)
WISHLIST = EventTypeSpec("wishlist", 3.0, "wished for", "also_viewed", target_rank=4)
STYLED = RelationKindSpec(
    "styled_with",
    "co-occurrence",
    "styled with {src}",
    ("support",),
    "worn together in {n} outfits",
    "Worn in one outfit.",
)


def _event(event_type: str) -> bytes:
    return json.dumps(
        {
            "event_id": "e1",
            "user_id": "u1",
            "item_id": "i1",
            "event_type": event_type,
            "ts": TS.isoformat(),
        }
    ).encode()


def test_a_new_event_type_is_validated_weighted_folded_and_worded() -> None:
    assert isinstance(decode(_event("wishlist"), BehaviorEvent), Rejection)
    with vocabulary.extended(event_types=[WISHLIST]):
        event = decode(_event("wishlist"), BehaviorEvent)
        assert isinstance(event, BehaviorEvent)
        schema = BehaviorEvent.model_json_schema()
        assert "wishlist" in schema["properties"]["event_type"]["enum"]
        config = FoldConfig.from_settings(StreamsSettings())
        assert config.weights["wishlist"] == 3.0
        result = fold_event(None, event, config)
        (entry,) = result.profile.history
        assert (entry.last_event_type, entry.weight) == ("wishlist", 3.0)
        assert result.basket_kind == "also_viewed"
        assert profile_text([entry], {"i1": "Silk Scarf"}) == "wished for: Silk Scarf"
        assert vocabulary.target_preference()[-1] == "wishlist"
    rejected = decode(_event("wishlist"), BehaviorEvent)
    assert isinstance(rejected, Rejection)
    assert rejected.error_type == "unknown_event_type"
    assert "valid: view, click, add_to_cart, purchase, return" in rejected.reason


def _related(kind: str) -> RelatedItems:
    return RelatedItems.model_validate(
        {
            "item_id": "h1",
            "item_count": 4.0,
            "related": [
                {
                    "item_id": "c1",
                    "kind": kind,
                    "score": 0.8,
                    "evidence": {"support": 4, "text": "in 4 outfits"},
                }
            ],
            "updated_at": TS,
        }
    )


def test_a_new_relation_kind_is_served_ranked_explained_and_evaluated() -> None:
    with pytest.raises(BadRequest):
        parse_related_query({"kind": "styled_with"})
    with vocabulary.extended(relation_kinds=[STYLED]):
        assert parse_related_query({"kind": "styled_with"})[1] == "styled_with"
        params = openapi_document()["paths"]["/items/{item_id}/related"]["get"]["parameters"]
        assert "styled_with" in next(p for p in params if p["name"] == "kind")["schema"]["enum"]

        history = [
            HistoryEntry(item_id="h1", weight=8.0, last_event_type="purchase", last_ts=TS, count=1)
        ]
        table = RelatedTable.of({"h1": _related("styled_with")})
        (item,) = rank(history=history, related=table, vector_hits=(), k=1)
        assert item.item_id == "c1"
        assert item.reasons[0].kind == "styled_with"
        # Its wording comes from the vocabulary; its support is a field, not in the text.
        assert item.reasons[0].text == "styled with h1"
        assert item.reasons[0].support == 4

        # The evaluation's methods are strategies: a co-occurrence kind joins the kNN baseline.
        assert strategy_weights("cooccurrence", BlendWeights()).kind_weight("styled_with") == 1.0
        assert strategy_weights("transitions", BlendWeights()).kind_weight("styled_with") == 0.0
        assert strategy_weights("vector", BlendWeights()).kind_weight("styled_with") == 0.0
        assert BlendWeights().kind_weight("styled_with") == STYLED.weight
    assert BlendWeights().kind_weight("styled_with") == 0.0


def test_a_term_cannot_be_declared_twice() -> None:
    with (
        pytest.raises(ValueError, match="declared already"),
        vocabulary.extended(relation_kinds=[STYLED, STYLED]),
    ):
        pass
    assert "styled_with" not in vocabulary.relation_kinds()


def test_every_event_type_feeds_a_declared_relation_kind() -> None:
    for spec in vocabulary.event_type_specs():
        assert spec.basket_kind is None or spec.basket_kind in vocabulary.behaviour_kinds()
    assert vocabulary.target_preference() == ("purchase", "add_to_cart", "click")
